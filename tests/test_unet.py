"""UNet2D and its blocks: shapes, input checks, determinism, gradients, the attention seam, loading."""

import json
import math

import pytest
import torch
from torch import nn

from diffusion_core.models.attention import Attention, AttnProcessor
from diffusion_core.models.embeddings import TimestepEmbedding, Timesteps, timestep_embedding
from diffusion_core.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusion_core.models.unet import UNet2D, UNetConfig


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return UNet2D(UNetConfig.tiny()).eval()


@pytest.fixture(scope="module")
def tiny_classes():
    torch.manual_seed(0)
    return UNet2D(UNetConfig.tiny(num_class_embeds=4, resnet_time_scale_shift="scale_shift")).eval()


# -- embeddings ----------------------------------------------------------------------------------------
def test_timestep_embedding_is_the_sinusoidal_formula():
    t = torch.tensor([0.0, 7.0, 999.0])
    dim, shift = 8, 1.0
    emb = timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=shift)
    half = dim // 2
    for b, tb in enumerate(t.tolist()):
        for i in range(half):
            omega = 10000 ** (-i / (half - shift))
            assert emb[b, i].item() == pytest.approx(math.sin(tb * omega), abs=1e-4)
            assert emb[b, half + i].item() == pytest.approx(math.cos(tb * omega), abs=1e-4)
    flipped = timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=shift)
    assert torch.equal(flipped, torch.cat([emb[:, half:], emb[:, :half]], dim=1))


def test_timestep_embedding_odd_dim_pads_and_checks_shape():
    assert timestep_embedding(torch.arange(3), 5).shape == (3, 5)
    assert torch.all(timestep_embedding(torch.arange(3), 5)[:, -1] == 0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        timestep_embedding(torch.zeros(2, 1), 8)


def test_timestep_embedding_mlp_shapes():
    proj, mlp = Timesteps(16, True, 0), TimestepEmbedding(16, 64)
    assert mlp(proj(torch.tensor([1, 2]))).shape == (2, 64)
    assert [n for n, _ in mlp.named_parameters()] == ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]


# -- blocks --------------------------------------------------------------------------------------------
def test_resnet_block_shapes_and_parameter_names():
    block = ResnetBlock2D(16, 32, temb_channels=24, groups=8, time_embedding_norm="scale_shift")
    assert block(torch.randn(2, 16, 8, 8), torch.randn(2, 24)).shape == (2, 32, 8, 8)
    names = {n.split(".")[0] for n, _ in block.named_parameters()}
    assert names == {"norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"}
    assert block.time_emb_proj.out_features == 64  # scale and shift
    vae_block = ResnetBlock2D(16, temb_channels=None, groups=8)
    assert vae_block.conv_shortcut is None and vae_block.time_emb_proj is None
    assert vae_block(torch.randn(1, 16, 4, 4)).shape == (1, 16, 4, 4)
    assert ResnetBlock2D(16, 16, 8, groups=8, down=True)(torch.randn(1, 16, 8, 8), torch.randn(1, 8)).shape == (1, 16, 4, 4)


def test_resnet_block_errors():
    with pytest.raises(ValueError, match="not divisible"):
        ResnetBlock2D(12, 16, groups=8)
    block = ResnetBlock2D(16, 16, temb_channels=8, groups=8)
    with pytest.raises(ValueError, match=r"\(B, 16, H, W\)"):
        block(torch.randn(1, 8, 4, 4), torch.randn(1, 8))
    with pytest.raises(ValueError, match="temb"):
        block(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="temb"):
        block(torch.randn(1, 16, 4, 4), torch.randn(1, 9))


def test_resamplers():
    x = torch.randn(1, 8, 7, 7)
    assert Downsample2D(8, padding=1)(x).shape == (1, 8, 4, 4)
    assert Downsample2D(8, padding=0)(torch.randn(1, 8, 8, 8)).shape == (1, 8, 4, 4)
    assert Downsample2D(8, use_conv=False)(torch.randn(1, 8, 8, 8)).shape == (1, 8, 4, 4)
    assert Upsample2D(8, out_channels=4)(torch.randn(1, 8, 4, 4)).shape == (1, 4, 8, 8)
    assert Upsample2D(8)(torch.randn(1, 8, 4, 4), output_size=(7, 7)).shape == (1, 8, 7, 7)
    with pytest.raises(ValueError, match=r"\(B, 8, H, W\)"):
        Downsample2D(8)(torch.randn(1, 3, 8, 8))


def test_attention_on_pixels_equals_attention_on_flattened_tokens():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, bias=True)
    x = torch.randn(2, 16, 4, 3)
    tokens = x.flatten(2).transpose(1, 2)
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out.flatten(2).transpose(1, 2), attn(tokens))


def test_attention_matches_the_softmax_formula_and_checks_shapes():
    torch.manual_seed(0)
    attn = Attention(8, cross_attention_dim=6, heads=2, dim_head=4)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    q, k, v = (t.view(2, -1, 2, 4).transpose(1, 2) for t in (attn.to_q(x), attn.to_k(c), attn.to_v(c)))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = attn.to_out[0]((w @ v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x, c), expected)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        attn(x, torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="Attention expects"):
        attn(torch.randn(2, 5, 7))


def test_attention_processor_seam_swaps_the_computation_and_registers_weights():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True)
    x = torch.randn(1, 16, 4, 4)
    reference = attn(x)

    class ExtraKV(nn.Module):  # an IP-Adapter-like processor: one more key/value path
        def __init__(self):
            super().__init__()
            self.to_k_ip = nn.Linear(16, 16, bias=False)
            self.to_v_ip = nn.Linear(16, 16, bias=False)
            self.scale = 0.0

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, image_tokens=None):
            residual = hidden_states
            x, spatial = attn.to_tokens(hidden_states)
            q = attn.heads_to_batch(attn.to_q(x))
            k, v = attn.heads_to_batch(attn.to_k(x)), attn.heads_to_batch(attn.to_v(x))
            out = attn.attend(q, k, v)
            ki, vi = attn.heads_to_batch(self.to_k_ip(image_tokens)), attn.heads_to_batch(self.to_v_ip(image_tokens))
            out = out + self.scale * attn.attend(q, ki, vi)
            out = attn.to_out[0](attn.batch_to_heads(out))
            return attn.from_tokens(out, residual, spatial)

    attn.set_processor(ExtraKV())
    assert "processor.to_k_ip.weight" in attn.state_dict()
    torch.testing.assert_close(attn(x, image_tokens=torch.randn(1, 3, 16)), reference)
    attn.processor.scale = 1.0
    assert not torch.allclose(attn(x, image_tokens=torch.randn(1, 3, 16)), reference)
    attn.set_processor(AttnProcessor())
    assert not any("processor" in k for k in attn.state_dict())
    torch.testing.assert_close(attn(x), reference)


# -- the UNet ------------------------------------------------------------------------------------------
def test_unet_output_shape_and_learned_variance_channels(tiny):
    x = torch.randn(2, 3, 16, 16)
    assert tiny(x, torch.tensor([0, 999])).shape == (2, 3, 16, 16)
    assert tiny(torch.randn(1, 3, 8, 24), 5).shape == (1, 3, 8, 24)
    wide = UNet2D(UNetConfig.tiny(out_channels=6))
    assert wide(x, torch.tensor([3, 4])).shape == (2, 6, 16, 16)


def test_unet_scalar_t_broadcasts(tiny):
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        full = tiny(x, torch.full((3,), 17))
        torch.testing.assert_close(tiny(x, 17), full)
        torch.testing.assert_close(tiny(x, torch.tensor(17)), full)
        torch.testing.assert_close(tiny(x, torch.tensor(17.0)), full)


def test_unet_is_deterministic(tiny):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 6])
    with torch.no_grad():
        assert torch.equal(tiny(x, t), tiny(x, t))
    torch.manual_seed(1)
    a = UNet2D(UNetConfig.tiny())
    torch.manual_seed(1)
    b = UNet2D(UNetConfig.tiny())
    with torch.no_grad():
        assert torch.equal(a(x, t), b(x, t))


def test_unet_input_errors_name_the_problem(tiny):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny(torch.randn(2, 1, 16, 16), 0)
    with pytest.raises(ValueError, match="multiples of 2"):
        tiny(torch.randn(2, 3, 15, 16), 0)
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        tiny(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        tiny(x, torch.zeros(2, 1))
    with pytest.raises(ValueError, match="no class embedding"):
        tiny(x, 0, class_labels=torch.tensor([0, 1]))


def test_unet_class_labels_are_checked(tiny_classes):
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        a = tiny_classes(x, t, torch.tensor([0, 3]))
        b = tiny_classes(x, t, torch.tensor([1, 3]))
    assert a.shape == (2, 3, 16, 16)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        tiny_classes(x, t)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        tiny_classes(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integers"):
        tiny_classes(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        tiny_classes(x, t, torch.tensor([0]))


def test_unet_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet2D(UNetConfig.tiny(num_class_embeds=3))
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([0, 2]))
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.conv_in.weight.grad.abs().sum() > 0


def test_unet_uses_diffusers_module_names():
    names = {n for n, _ in UNet2D(UNetConfig.tiny(num_class_embeds=2)).named_parameters()}
    for expected in (
        "conv_in.weight", "time_embedding.linear_1.weight", "class_embedding.weight",
        "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.downsamplers.0.conv.weight",
        "down_blocks.1.attentions.0.to_q.weight", "down_blocks.1.attentions.0.group_norm.weight",
        "mid_block.resnets.1.conv2.weight", "mid_block.attentions.0.to_out.0.weight",
        "up_blocks.0.resnets.1.conv_shortcut.weight", "up_blocks.0.upsamplers.0.conv.weight",
        "conv_norm_out.weight", "conv_out.bias",
    ):
        assert expected in names, expected


def test_config_validation_errors():
    with pytest.raises(ValueError, match="same length"):
        UNetConfig.tiny(block_out_channels=(32, 64, 64))
    with pytest.raises(ValueError, match="norm_num_groups"):
        UNetConfig.tiny(block_out_channels=(32, 60))
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.tiny(attention_head_dim=24)
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        UNetConfig.tiny(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"))
    with pytest.raises(ValueError, match="scale_shift"):
        UNetConfig.tiny(resnet_time_scale_shift="ada_group")
    with pytest.raises(ValueError, match="unknown UNet2DModel keys"):
        UNetConfig.from_diffusers_config({"sample_size": 32, "cross_attention_dim": 768})


def test_diffusers_config_round_trip():
    cfg = UNetConfig.ddpm_256(num_class_embeds=10, resnet_time_scale_shift="scale_shift")
    back = UNetConfig.from_diffusers_config({"_class_name": "UNet2DModel", **cfg.to_diffusers_config()})
    assert back == cfg
    # keys left out of a config.json mean what they mean in diffusers
    assert UNetConfig.from_diffusers_config({"block_out_channels": [32, 64], "norm_num_groups": 8,
                                             "attention_head_dim": 8,
                                             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                                             "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}).norm_eps == 1e-5


def test_from_pretrained_reads_a_diffusers_folder_with_safetensors_only(tmp_path, tiny):
    from safetensors.torch import save_file

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(
        json.dumps({"_class_name": "UNet2DModel", **tiny.config.to_diffusers_config()})
    )
    save_file(tiny.state_dict(), str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    loaded = UNet2D.from_pretrained(tmp_path).eval()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), tiny(x, t))
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        UNet2D.from_pretrained(tmp_path)


def test_identity_class_embedding_adds_given_vectors():
    torch.manual_seed(0)
    model = UNet2D(UNetConfig.tiny(class_embed_type="identity")).eval()
    x, dim = torch.randn(2, 3, 16, 16), model.config.time_embed_dim
    with torch.no_grad():
        assert model(x, 3, torch.zeros(2, dim)).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=f"\\(2, {dim}\\)"):
        model(x, 3, torch.zeros(2))


def test_attention_mask_blocks_keys():
    torch.manual_seed(0)
    attn = Attention(8, cross_attention_dim=4, heads=2, dim_head=4)
    x, c = torch.randn(1, 3, 8), torch.randn(1, 5, 4)
    keep = torch.tensor([True, True, False, False, False])
    torch.testing.assert_close(attn(x, c, attention_mask=keep[None, None, None, :]), attn(x, c[:, :2]))


def test_from_pretrained_with_a_broken_config_json_names_the_file(tmp_path, tiny):
    from safetensors.torch import save_file

    save_file(tiny.state_dict(), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text('{"in_channels": 3,')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        UNet2D.from_pretrained(tmp_path)


@pytest.mark.parametrize("build, words", [
    (lambda: UNetConfig.tiny(attention_head_dim=0), "attention_head_dim must be positive"),
    (lambda: UNetConfig.tiny(attn_norm_num_groups=0), "attn_norm_num_groups must be positive"),
    (lambda: UNetConfig.tiny(block_out_channels=(0, 0)), "block_out_channels must all be positive"),
    (lambda: Attention(32, heads=4, dim_head=8, norm_num_groups=0), "Attention: norm_num_groups must be positive"),
    (lambda: ResnetBlock2D(32, 32, temb_channels=None, groups=0), "GroupNorm groups must be positive"),
])
def test_zero_groups_or_heads_are_value_errors_not_zero_division(build, words):
    with pytest.raises(ValueError, match=words):  # before: ZeroDivisionError (integer modulo by zero)
        build()
