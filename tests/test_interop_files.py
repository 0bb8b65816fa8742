"""Loading models saved on disk in the diffusers / transformers layouts (safetensors only)."""

from __future__ import annotations

import pytest
import torch

from diffusion_core import interop


def test_diffusers_unet_and_vae_folders_load_with_the_same_outputs(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    unet.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
    vae.save_pretrained(tmp_path / "pipe" / "vae", safe_serialization=True)
    ours_unet = interop.load_pretrained(tmp_path / "pipe", subfolder="unet").eval()
    ours_vae = interop.load_pretrained(tmp_path / "pipe" / "vae").eval()
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 16), torch.tensor([3, 500])
    with torch.no_grad():
        assert torch.allclose(ours_unet(x, t, encoder_hidden_states=ctx), unet(x, t, encoder_hidden_states=ctx).sample,
                              atol=1e-5)
        img = torch.randn(1, 3, 16, 16)
        assert torch.allclose(ours_vae.encode(img).mean, vae.encode(img).latent_dist.mean, atol=1e-5)


def test_transformers_clip_text_folder_loads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=99)
    ref = transformers.CLIPTextModel(cfg).eval()
    ref.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    ours = interop.load_pretrained(tmp_path / "text_encoder").eval()
    ids = torch.tensor([[5, 6, 7, 99, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(ours(ids).last_hidden_state, ref(ids).last_hidden_state, atol=1e-5)


def test_missing_config_and_pickles_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="subfolder"):
        interop.load_pretrained(tmp_path)
    (tmp_path / "model.bin").write_bytes(b"not a pickle you should open")
    with pytest.raises(ValueError, match="only .safetensors"):
        interop.load_safetensors(torch.nn.Linear(1, 1), tmp_path / "model.bin")


def test_safetensors_file_with_wrong_keys_is_named(tmp_path):
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(interop.CheckpointMismatchError, match="extra"):
        interop.load_safetensors(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")


def _drop_weight(weights, key_part: str) -> str:
    """Delete the first weight whose name contains ``key_part`` from a safetensors file (a damaged
    checkpoint); return its name."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    key = next(k for k in sorted(state) if key_part in k)
    del state[key]
    save_file(state, str(weights), metadata={"format": "pt"})
    return key


def test_transformers_folder_with_a_missing_weight_is_an_error_naming_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=99)
    transformers.CLIPTextModel(cfg).save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    key = _drop_weight(tmp_path / "text_encoder" / "model.safetensors", "layer_norm1.weight")
    # transformers alone would initialise the weight at random and only log it
    with pytest.raises(interop.CheckpointMismatchError, match=r"missing keys: .*layer_norm1\.weight") as err:
        interop.load_pretrained(tmp_path / "text_encoder")
    assert key.split(".", 1)[-1] in str(err.value) and "text_encoder" in str(err.value)


def test_diffusers_folder_with_a_missing_weight_is_an_error_naming_it(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    key = _drop_weight(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", "conv_norm_out.weight")
    with pytest.raises(interop.CheckpointMismatchError, match="missing keys") as err:
        interop.load_pretrained(tmp_path / "vae")
    assert key in str(err.value)


def test_broken_config_json_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL", ')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*line 1"):
        interop.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        interop.load_pretrained(tmp_path)
