"""Chapters 07-08's recipes and claims: the add-on joins the locked model through one function, a fresh
ControlNet changes no sample, adapters compose by a weighted sum, the recipes train the add-on only."""

import pytest
import torch

from diffusion_core import store
from diffusion_core.experiments import control as claim
from diffusion_core.models.controlnet import ControlNet
from diffusion_core.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from diffusion_core.recipes import control as C
from diffusion_core.recipes import latent as L

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def base_parts():
    import diffusion_core as dc

    profile = dc.setup("smoke", verbose=False)
    stored, vae, diffusion = C.load_base(profile)
    return profile, stored, vae, diffusion


def _ctx(stored, captions):
    tok = L.tokenizer_for(stored.config)
    with torch.no_grad():
        return stored.model.encode_text(tok.encode(captions)), stored.model.encode_text(tok.encode([L.NULL_CAPTION]))


def test_a_fresh_controlnet_changes_no_sample(base_parts):
    profile, stored, vae, diffusion = base_parts
    base = stored.model
    world = L.world_for(profile, text=True, max_objects=1)
    scenes = world.fixed(4, seed=3)
    ctx, null = _ctx(stored, scenes.captions)
    net = ControlNet.from_unet(base.unet, 1, (16, 32, 32))
    plain = C.sample(base, diffusion, vae, ctx, null, steps=3, seed=5, profile=profile)
    controlled = C.sample(base, diffusion, vae, ctx, null, net, scenes.edges, steps=3, seed=5, profile=profile)
    assert torch.equal(plain, controlled)
    # the same seed gives the same noise; another seed another sample
    assert torch.equal(plain, C.sample(base, diffusion, vae, ctx, null, steps=3, seed=5, profile=profile))
    assert not torch.equal(plain, C.sample(base, diffusion, vae, ctx, null, steps=3, seed=6, profile=profile))


def test_unet_kwargs_join_controlnets_by_sum_and_adapters_by_weighted_features(base_parts):
    _, stored, _, _ = base_parts
    base = stored.model
    torch.manual_seed(0)
    nets = [ControlNet.from_unet(base.unet, ch, (16, 32, 32)) for ch in (1, 3)]
    for n in nets:
        with torch.no_grad():
            for p in n.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 50])
    ctx, _ = _ctx(stored, ["a red circle at the top", "a blue square on the left"])
    conds = [torch.rand(2, 1, 32, 32), torch.rand(2, 3, 32, 32)]
    with torch.no_grad():
        both = C.unet_kwargs(base, nets, x, t, ctx, conds, [0.5, 2.0])
        a = C.unet_kwargs(base, nets[0], x, t, ctx, conds[0], 0.5)
        b = C.unet_kwargs(base, nets[1], x, t, ctx, conds[1], 2.0)
    for s, u, v in zip(both["down_block_additional_residuals"], a["down_block_additional_residuals"],
                       b["down_block_additional_residuals"]):
        torch.testing.assert_close(s, u + v)

    w = base.unet.config.block_out_channels[0]
    adapters = [T2IAdapter(T2IAdapterConfig(in_channels=ch, channels=(w, 2 * w, 2 * w), num_res_blocks=1,
                                            downscale_factor=4)) for ch in (1, 3)]
    with torch.no_grad():
        feats = C.adapter_features(adapters, conds, [0.3, 0.7])
        by_hand = [0.3 * f + 0.7 * g for f, g in zip(adapters[0](conds[0]), adapters[1](conds[1]))]
        kw = C.unet_kwargs(base, adapters, torch.cat([x, x]), t.repeat(2), ctx.repeat(2, 1, 1), conds, [0.3, 0.7])
    for f, g in zip(feats, by_hand):
        torch.testing.assert_close(f, g)
    # features are computed for the conditions' batch and repeated for a doubled (guided) batch
    assert [tuple(f.shape) for f in kw["down_intrablock_additional_residuals"]] == [
        (4, *f.shape[1:]) for f in feats]

    with pytest.raises(ValueError, match="all be ControlNets or all T2I-Adapters"):
        C.unet_kwargs(base, [nets[0], adapters[0]], x, t, ctx, conds, 1.0)
    with pytest.raises(ValueError, match="2 add-ons need as many conditions and scales; got 1"):
        C.unet_kwargs(base, nets, x, t, ctx, [conds[0]], 1.0)


def test_training_set_keeps_the_maps_in_their_ranges(base_parts):
    profile = base_parts[0]
    data = L.training_set(profile, 1)
    i = torch.arange(5)
    edges, depth, palette = (data.condition(k, i) for k in ("edges", "depth", "palette"))
    assert set(edges.unique().tolist()) <= {0.0, 1.0} and edges.shape == (5, 1, 32, 32)
    assert 0 <= depth.min() and depth.max() <= 1
    assert palette.shape == (5, 3, 32, 32) and -1 <= palette.min() and palette.max() <= 1
    with pytest.raises(ValueError, match="condition kind 'sketch'"):
        data.condition("sketch")
    with pytest.raises(ValueError, match="condition kind must be one of edges, depth, palette"):
        C.conditions(L.world_for(profile, text=True, max_objects=1).fixed(2), "sketch")


def test_recipe_trains_the_addon_only_and_records_its_adherence_curve(base_parts):
    profile, stored, _, _ = base_parts
    before = {k: v.clone() for k, v in stored.model.state_dict().items()}
    cn = store.load(C.controlnet_recipe_name("edges"), profile, verbose=False)
    budget = C.control_budget(profile)
    steps = [s for s, _ in cn.metrics["adherence_by_step"]]
    assert steps[0] == 0 and steps[-1] == budget["steps"] - 1 and len(steps) >= 2
    assert all(0.0 <= f1 <= 1.0 for _, f1 in cn.metrics["adherence_by_step"])
    assert cn.metrics["parameters"] == sum(p.numel() for p in cn.model.parameters())
    # it learned: the zero convs left zero
    assert cn.model.controlnet_mid_block.weight.abs().sum() > 0
    # and the base stayed locked: the stored base is what it was
    after = store.load(C.BASE, profile, verbose=False).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ad = store.load(C.adapter_recipe_name("palette"), profile, verbose=False)
    assert isinstance(ad.model, T2IAdapter) and ad.model.config.in_channels == 3
    assert ad.metrics["steps"] == cn.metrics["steps"] and ad.metrics["batch_size"] == cn.metrics["batch_size"]


def test_identity_at_init_is_exact_and_verdicts_read_the_fixed_bars(base_parts):
    profile = base_parts[0]
    ident = claim.identity_at_init(profile, n=4)
    assert ident["equal"] and ident["max_abs_diff"] == 0.0
    ch07 = {"edge_f1_base": 0.3, "edge_f1_control": 0.55, "edge_f1_real": 1.0, "caption_accuracy_control": 0.6,
            "caption_accuracy_base": 0.7, "composition_f1_edges": 0.35}
    v = claim.verdicts(ch07=ch07)
    assert v == {"controlnet_f1_over_base": True, "controlnet_f1_of_real": True, "caption_kept": True,
                 "composition_f1_over_base": False}
    ch08 = {"params_adapter": 10, "params_controlnet": 30, "adapter_step_overhead": 1.01,
            "controlnet_step_overhead": 1.5, "edge_f1_adapter": 0.35, "edge_f1_base": 0.3}
    assert claim.verdicts(ch08=ch08) == {"adapter_params_of_controlnet": True,
                                         "adapter_overhead_below_controlnet": True, "adapter_f1_over_base": False}


def test_recipes_are_registered_by_name():
    for name in ("shapes-controlnet-edges", "shapes-controlnet-depth", "shapes-t2i-adapter-edges",
                 "shapes-t2i-adapter-depth", "shapes-t2i-adapter-palette"):
        assert store.recipe(name).name == name
