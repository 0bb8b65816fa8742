"""IP-Adapter (chapter 09): decoupled cross-attention, the official file layout, parity with diffusers.

Random small UNets with every weight perturbed, random adapter weights in the official layout (base:
proj + norm; plus: the Resampler), loaded into diffusers with ``_load_ip_adapter_weights`` and into
ours with ``interop.load_ip_adapter``: the outputs agree within 1e-5 (relative), and so does every
weight, key by key. One UNet has all its cross-attention layers at one width, where loading the
layers in the wrong order would raise nothing."""

from __future__ import annotations

import pytest
import torch
from parity_utils import perturb, rel_error

from diffusion_core import interop
from diffusion_core.interop import CheckpointMismatchError
from diffusion_core.models.attention import AttnProcessor
from diffusion_core.models.ip_adapter import (
    ImageProjection,
    IPAdapter,
    IPAdapterAttnProcessor,
    IPAdapterPlusImageProjection,
    attach_ip_adapters,
    ip_adapter_parameters,
)
from diffusion_core.models.unet_cond import CondUNetConfig, UNet2DCondition

diffusers = pytest.importorskip("diffusers")
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0  # noqa: E402

TOL = 1e-5
CROSS = 24  # the text tokens' width
EMBED = 20  # the image encoder's width

UNET_CONFIGS = {
    # widths 16 and 32, cross-attention in one down block, one up block and the middle
    "mixed": dict(block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, attention_head_dim=2),
    # every cross-attention layer 32 wide (down, up and middle, two transformer layers in the first
    # level): any permutation of the layers has the right shapes
    "one-width": dict(block_out_channels=(32, 32), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(2, 1),
                      transformer_layers_per_block=(2, 1), attention_head_dim=2, use_linear_projection=True),
}


def _diffusers_unet(name: str, seed: int = 0):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=8, cross_attention_dim=CROSS, norm_num_groups=8,
                                          **UNET_CONFIGS[name]).eval()
    perturb(unet, 100 + seed)
    return unet


def _randn(g: torch.Generator, *shape: int, around: float = 0.0) -> torch.Tensor:
    return around + 0.2 * torch.randn(*shape, generator=g)


def _official_base(g: torch.Generator, tokens: int = 4) -> dict[str, torch.Tensor]:
    return {"proj.weight": _randn(g, tokens * CROSS, EMBED), "proj.bias": _randn(g, tokens * CROSS),
            "norm.weight": _randn(g, CROSS, around=1.0), "norm.bias": _randn(g, CROSS)}


def _official_plus(g: torch.Generator, hidden: int = 32, heads: int = 2, queries: int = 6,
                   depth: int = 4) -> dict[str, torch.Tensor]:
    """The official Resampler's keys (tencent-ailab/IP-Adapter resampler.py): layers.i.0 is the
    PerceiverAttention (norm1, norm2, to_q, to_kv, to_out), layers.i.1 the FeedForward
    Sequential(LayerNorm, Linear, GELU, Linear). Heads are 64 wide."""
    inner = 64 * heads
    sd = {"latents": _randn(g, 1, queries, hidden), "proj_in.weight": _randn(g, hidden, EMBED),
          "proj_in.bias": _randn(g, hidden), "proj_out.weight": _randn(g, CROSS, hidden), "proj_out.bias": _randn(g, CROSS),
          "norm_out.weight": _randn(g, CROSS, around=1.0), "norm_out.bias": _randn(g, CROSS)}
    for i in range(depth):
        p = f"layers.{i}."
        sd |= {p + "0.norm1.weight": _randn(g, hidden, around=1.0), p + "0.norm1.bias": _randn(g, hidden),
               p + "0.norm2.weight": _randn(g, hidden, around=1.0), p + "0.norm2.bias": _randn(g, hidden),
               p + "0.to_q.weight": _randn(g, inner, hidden), p + "0.to_kv.weight": _randn(g, 2 * inner, hidden),
               p + "0.to_out.weight": _randn(g, hidden, inner), p + "1.0.weight": _randn(g, hidden, around=1.0),
               p + "1.0.bias": _randn(g, hidden), p + "1.1.weight": _randn(g, 4 * hidden, hidden),
               p + "1.3.weight": _randn(g, hidden, 4 * hidden)}
    return sd


def _official(theirs, layout: str, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """An adapter in the official layout for the diffusers UNet ``theirs``: its layers numbered by
    their position in diffusers' own ``attn_processors``, widths read from diffusers' modules."""
    g = torch.Generator().manual_seed(seed)
    image_proj = _official_base(g) if layout == "base" else _official_plus(g)
    ip = {}
    for i, name in enumerate(theirs.attn_processors):
        if name.endswith("attn2.processor"):
            width = theirs.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip[f"{i}.to_k_ip.weight"] = _randn(g, width, CROSS)
            ip[f"{i}.to_v_ip.weight"] = _randn(g, width, CROSS)
    return {"image_proj": image_proj, "ip_adapter": ip}


def _copy(sd):
    return {part: dict(weights) for part, weights in sd.items()}


def _embeds(layout: str, g: torch.Generator, batch: int = 2, images: int = 1) -> torch.Tensor:
    return torch.randn(batch, images, EMBED, generator=g) if layout == "base" else \
        torch.randn(batch, images, 7, EMBED, generator=g)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return g, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 5, CROSS, generator=g)


def _set_diffusers_scale(unet, scale: list[float]) -> None:
    for p in unet.attn_processors.values():
        if isinstance(p, IPAdapterAttnProcessor2_0):
            p.scale = list(scale)


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_attention_layers_come_in_diffusers_order_down_up_mid(name):
    theirs = _diffusers_unet(name)
    ours = interop.from_diffusers(theirs)
    assert list(ours.attention_processors()) == list(theirs.attn_processors)
    names = [n for n, _ in ours.attention_layers()]
    assert names[0].startswith("down_blocks") and names[-1].startswith("mid_block")
    assert [n for n, _ in ours.cross_attentions()] == [n for n in names if n.endswith("attn2")]


@pytest.mark.parametrize("layout", ["base", "plus"])
@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_ip_adapter_matches_diffusers_in_outputs_and_in_every_weight(name, layout):
    theirs = _diffusers_unet(name)
    ours = interop.from_diffusers(theirs).eval()
    sd = _official(theirs, layout, seed=1)
    theirs._load_ip_adapter_weights([_copy(sd)], low_cpu_mem_usage=False)
    interop.load_ip_adapter(ours, sd)
    assert ours.num_ip_adapters == 1

    # the same weights under the same names: diffusers' own loading fixes which layer gets which
    a_sd, b_sd = theirs.state_dict(), ours.state_dict()
    assert set(a_sd) == set(b_sd)
    assert all(torch.equal(a_sd[k], b_sd[k]) for k in a_sd)

    g, x, t, ctx = _inputs()
    e = _embeds(layout, g)
    with torch.no_grad():
        tokens_a, tokens_b = theirs.encoder_hid_proj([e])[0], ours.encoder_hid_proj([e])[0]
        assert tokens_a.shape == tokens_b.shape == (2, 1, 4 if layout == "base" else 6, CROSS)
        assert rel_error(tokens_a, tokens_b) <= TOL
        a = theirs(x, t, ctx, added_cond_kwargs={"image_embeds": [e]}).sample
        b = ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]})
        assert rel_error(a, b) <= TOL
        # the image prompt matters: the comparison above is not of two text-only outputs
        interop.set_ip_adapter_scale(ours, 0.0)
        assert rel_error(a, ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]})) > 1e-2
        # a half-weighted image prompt, both sides
        _set_diffusers_scale(theirs, [0.5])
        interop.set_ip_adapter_scale(ours, 0.5)
        a = theirs(x, t, ctx, added_cond_kwargs={"image_embeds": [e]}).sample
        b = ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]})
        assert rel_error(a, b) <= TOL


def test_layers_loaded_in_forward_order_load_silently_but_the_outputs_catch_it():
    """The trap of architecture review 1.3: numbering the layers down, mid, up (the forward pass's
    order) instead of down, up, mid. At one width every shape fits, so only the outputs tell."""
    theirs = _diffusers_unet("one-width")
    ours = interop.from_diffusers(theirs).eval()
    sd = _official(theirs, "base", seed=2)
    theirs._load_ip_adapter_weights([_copy(sd)], low_cpu_mem_usage=False)
    diffusers_numbers = [i for i, n in enumerate(theirs.attn_processors) if n.endswith("attn2.processor")]
    forward_names = sorted((n for n in theirs.attn_processors if n.endswith("attn2.processor")),
                           key=lambda n: ("down_blocks", "mid_block", "up_blocks").index(n.split(".")[0]))
    forward_numbers = [list(theirs.attn_processors).index(n) for n in forward_names]
    assert forward_numbers != diffusers_numbers
    # what a loader zipping the file's numbers with the forward order would install
    remap = dict(zip(diffusers_numbers, forward_numbers))
    wrong = {"image_proj": sd["image_proj"], "ip_adapter": {}}
    for key, value in sd["ip_adapter"].items():
        i, rest = key.split(".", 1)
        wrong["ip_adapter"][f"{remap[int(i)]}.{rest}"] = value
    interop.load_ip_adapter(ours, wrong)  # no error: every layer is 32 wide
    g, x, t, ctx = _inputs()
    e = _embeds("base", g)
    with torch.no_grad():
        a = theirs(x, t, ctx, added_cond_kwargs={"image_embeds": [e]}).sample
        assert rel_error(a, ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]})) > 1e-3
        interop.load_ip_adapter(ours, sd)
        assert rel_error(a, ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]})) <= TOL


def test_two_adapters_at_once_with_their_own_scales_match_diffusers():
    theirs = _diffusers_unet("mixed")
    ours = interop.from_diffusers(theirs).eval()
    base, plus = _official(theirs, "base", seed=3), _official(theirs, "plus", seed=4)
    theirs._load_ip_adapter_weights([_copy(base), _copy(plus)], low_cpu_mem_usage=False)
    interop.load_ip_adapter(ours, [base, plus])
    assert ours.num_ip_adapters == 2
    _set_diffusers_scale(theirs, [0.7, 0.3])
    interop.set_ip_adapter_scale(ours, [0.7, 0.3])
    assert all(a.processor.scale == [0.7, 0.3] for _, a in ours.cross_attentions())
    g, x, t, ctx = _inputs(1)
    embeds = [_embeds("base", g, images=2), _embeds("plus", g)]  # two images for the first adapter
    with torch.no_grad():
        a = theirs(x, t, ctx, added_cond_kwargs={"image_embeds": list(embeds)}).sample
        b = ours(x, t, ctx, added_cond_kwargs={"image_embeds": embeds})
        assert rel_error(a, b) <= TOL
        # one adapter weighed out: the other one alone, still as diffusers computes it
        _set_diffusers_scale(theirs, [0.0, 0.3])
        interop.set_ip_adapter_scale(ours, [0.0, 0.3])
        a = theirs(x, t, ctx, added_cond_kwargs={"image_embeds": list(embeds)}).sample
        assert rel_error(a, ours(x, t, ctx, added_cond_kwargs={"image_embeds": embeds})) <= TOL


def test_scale_zero_is_exactly_the_text_only_unet_and_unloading_restores_it():
    theirs = _diffusers_unet("mixed")
    text_only = interop.from_diffusers(theirs).eval()
    ours = interop.from_diffusers(theirs).eval()
    plain_keys = list(ours.state_dict())
    interop.load_ip_adapter(ours, [_official(theirs, "base", 5), _official(theirs, "plus", 6)])
    g, x, t, ctx = _inputs(2)
    embeds = [_embeds("base", g), _embeds("plus", g)]
    with torch.no_grad():
        reference = text_only(x, t, ctx)
        assert not torch.equal(ours(x, t, ctx, added_cond_kwargs={"image_embeds": embeds}), reference)
        interop.set_ip_adapter_scale(ours, 0)
        assert torch.equal(ours(x, t, ctx, added_cond_kwargs={"image_embeds": embeds}), reference)
        interop.unload_ip_adapter(ours)
        assert ours.encoder_hid_proj is None and ours.num_ip_adapters == 0
        assert all(type(a.processor) is AttnProcessor for _, a in ours.attention_layers())
        assert list(ours.state_dict()) == plain_keys
        assert torch.equal(ours(x, t, ctx), reference)
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        interop.set_ip_adapter_scale(ours, 0.5)


def test_official_layout_round_trips_and_loads_from_a_flat_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    theirs = _diffusers_unet("mixed")
    ours = interop.from_diffusers(theirs).eval()
    for layout in ("base", "plus"):
        sd = _official(theirs, layout, 7)
        back = IPAdapter.from_official(sd, ours).official_state_dict()
        assert {p: sorted(v) for p, v in back.items()} == {p: sorted(v) for p, v in sd.items()}
        assert all(torch.equal(back[p][k], sd[p][k]) for p in sd for k in sd[p])
    flat = {f"{part}.{k}": v.contiguous() for part, weights in sd.items() for k, v in weights.items()}
    save_file(flat, tmp_path / "ip-adapter.safetensors")
    g, x, t, ctx = _inputs(3)
    e = _embeds("plus", g)
    with torch.no_grad():
        interop.load_ip_adapter(ours, sd)
        a = ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]})
        interop.load_ip_adapter(ours, tmp_path / "ip-adapter.safetensors")
        assert torch.equal(a, ours(x, t, ctx, added_cond_kwargs={"image_embeds": [e]}))
    with pytest.raises(ValueError, match="only .safetensors"):
        interop.load_ip_adapter(ours, tmp_path / "ip-adapter.bin")


def test_from_diffusers_converts_a_unet_with_ip_adapters_loaded():
    theirs = _diffusers_unet("one-width")
    theirs._load_ip_adapter_weights([_official(theirs, "plus", 8), _official(theirs, "base", 9)],
                                    low_cpu_mem_usage=False)
    _set_diffusers_scale(theirs, [0.6, 0.9])
    ours = interop.from_diffusers(theirs).eval()
    assert ours.num_ip_adapters == 2
    assert isinstance(ours.encoder_hid_proj.image_projection_layers[0], IPAdapterPlusImageProjection)
    assert isinstance(ours.encoder_hid_proj.image_projection_layers[1], ImageProjection)
    assert all(a.processor.scale == [0.6, 0.9] for _, a in ours.cross_attentions())
    g, x, t, ctx = _inputs(4)
    embeds = [_embeds("plus", g), _embeds("base", g)]
    with torch.no_grad():
        a = theirs(x, t, ctx, added_cond_kwargs={"image_embeds": list(embeds)}).sample
        assert rel_error(a, ours(x, t, ctx, added_cond_kwargs={"image_embeds": embeds})) <= TOL


# -- errors -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    theirs = _diffusers_unet("mixed")
    return theirs, _official(theirs, "base", 10), _official(theirs, "plus", 11)


def _fresh(theirs) -> UNet2DCondition:
    return interop.from_diffusers(theirs).eval()


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd["ip_adapter"].pop("3.to_v_ip.weight"), r"missing keys: 3\.to_v_ip\.weight"),
    (lambda sd: sd["ip_adapter"].update({"9.to_k_ip.weight": torch.zeros(32, CROSS)}), r"unexpected keys: 9\.to_k_ip"),
    (lambda sd: sd["ip_adapter"].update({"1.to_k_ip.weight": torch.zeros(16, CROSS + 1)}), r"1\.to_k_ip\.weight: \(16, 25\)"),
    (lambda sd: sd["image_proj"].pop("norm.bias"), r"missing keys: norm\.bias"),
    (lambda sd: sd["image_proj"].update({"extra.weight": torch.zeros(1)}), r"unexpected keys: extra\.weight"),
    (lambda sd: sd.pop("image_proj"), r"missing \['image_proj'\]"),
    (lambda sd: sd["image_proj"].update({"proj.weight": torch.zeros(4 * 32, EMBED), "proj.bias": torch.zeros(128),
                                         "norm.weight": torch.ones(32), "norm.bias": torch.zeros(32)}),
     r"proj\.weight makes tokens of width 32.*cross_attention_dim is 24"),
    (lambda sd: sd.update({"image_proj": {"proj.0.weight": torch.zeros(8, 4), "norm.weight": torch.ones(4)}}), "FaceID"),
])
def test_a_bad_base_adapter_file_is_an_error_naming_the_key(pair, edit, match):
    theirs, base, _ = pair
    sd = _copy(base)
    edit(sd)
    with pytest.raises(CheckpointMismatchError, match=match):
        interop.load_ip_adapter(_fresh(theirs), sd)


@pytest.mark.parametrize("edit, match", [
    (lambda sd: sd.pop("layers.1.0.to_kv.weight"), r"missing keys: layers\.1\.0\.to_kv\.weight"),
    (lambda sd: sd.update({"layers.2.1.3.weight": torch.zeros(32, 64)}), r"layers\.2\.1\.3\.weight: \(32, 64\) in the file"),
    (lambda sd: sd.update({"layers.4.0.to_q.weight": torch.zeros(128, 32)}), r"missing keys: layers\.4\.0\.norm1"),
    (lambda sd: sd.pop("latents"), r"missing key 'latents'"),
])
def test_a_bad_plus_adapter_file_is_an_error_naming_the_key(pair, edit, match):
    theirs, _, plus = pair
    sd = _copy(plus)
    edit(sd["image_proj"])
    with pytest.raises(CheckpointMismatchError, match=match):
        interop.load_ip_adapter(_fresh(theirs), sd)


def test_bad_image_embeds_are_errors_naming_the_problem(pair):
    theirs, base, plus = pair
    g, x, t, ctx = _inputs(5)
    plain = _fresh(theirs)
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        plain(x, t, ctx, added_cond_kwargs={"image_embeds": [_embeds("base", g)]})
    unet = interop.load_ip_adapter(_fresh(theirs), [base, plus])
    good = [_embeds("base", g), _embeds("plus", g)]
    cases = [
        (None, "needs added_cond_kwargs"),
        ({}, "needs added_cond_kwargs"),
        ({"image_embeds": good[:1]}, "got 1 image_embeds but 2 IP-Adapter"),
        ({"image_embeds": good + good[:1]}, "got 3 image_embeds but 2"),
        ({"image_embeds": good[0]}, "must be a list"),
        ({"image_embeds": [good[0][:, 0], good[1]]}, r"image_embeds\[0\] has shape \(2, 20\).*\(2, num_images, 20\)"),
        ({"image_embeds": [good[0], good[0]]}, r"image_embeds\[1\] has shape \(2, 1, 20\).*\(2, num_images, S, 20\)"),
        ({"image_embeds": [good[0][:1], good[1]]}, r"image_embeds\[0\] has shape \(1, 1, 20\)"),
        ({"image_embeds": [torch.randn(2, 1, EMBED + 1), good[1]]}, r"image_embeds\[0\] has shape \(2, 1, 21\)"),
        ({"image_embeds": good, "text_embeds": good[0]}, r"\['text_embeds'\] are not used"),
    ]
    for added, match in cases:
        with pytest.raises(ValueError, match=match):
            unet(x, t, ctx, added_cond_kwargs=added)
    with pytest.raises(ValueError, match="give one"):
        unet(x, t, ctx, added_cond_kwargs={"image_embeds": good}, cross_attention_kwargs={"ip_hidden_states": []})
    for bad, match in (([1.0, 2.0, 3.0], "3 scales for 2"), (float("nan"), "finite")):
        with pytest.raises(ValueError, match=match):
            interop.set_ip_adapter_scale(unet, bad)
    no_cross = UNet2DCondition(CondUNetConfig.class_conditional(num_classes=3, sample_size=8))
    with pytest.raises(ValueError, match="no cross-attention"):
        interop.load_ip_adapter(no_cross, base)


# -- training a fresh adapter ---------------------------------------------------------------------


def test_a_fresh_adapter_trains_only_its_own_weights_and_saves_in_the_official_layout(pair):
    theirs, base, _ = pair
    unet = _fresh(theirs).requires_grad_(False)
    adapter = IPAdapter.for_unet(unet, ImageProjection(EMBED, CROSS, num_tokens=4))
    attach_ip_adapters(unet, [adapter])
    assert isinstance(next(a for _, a in unet.cross_attentions()).processor, IPAdapterAttnProcessor)
    params = ip_adapter_parameters(unet)
    assert {id(p) for p in params} == {id(p) for p in adapter.parameters()}
    g, x, t, ctx = _inputs(6)
    unet(x, t, ctx, added_cond_kwargs={"image_embeds": [_embeds("base", g)]}).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    official = adapter.official_state_dict()
    assert {p: sorted(v) for p, v in official.items()} == {p: sorted(v) for p, v in base.items()}
    assert all(official[p][k].shape == base[p][k].shape for p in base for k in base[p])


def test_a_controlnet_copies_a_unet_with_an_ip_adapter_loaded(pair):
    from diffusion_core.models.controlnet import ControlNet

    theirs, base, _ = pair
    unet = interop.load_ip_adapter(_fresh(theirs), base)
    net = ControlNet.from_unet(unet)
    assert torch.equal(net.down_blocks[0].resnets[0].conv1.weight, unet.down_blocks[0].resnets[0].conv1.weight)
    assert not any(".processor." in k for k in net.state_dict())
