"""The named full-size configurations count exactly the parameters of the public checkpoints."""

import pytest
import torch

from diffusion_core import presets
from diffusion_core.models.unet import UNet2D, UNetConfig


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ddpm-cifar10", 35_746_307),  # google/ddpm-cifar10-32
        ("ddpm-256", 113_673_219),  # google/ddpm-celebahq-256, ddpm-church-256, ...
    ],
)
def test_ddpm_preset_counts_the_public_checkpoint_on_meta(name, expected):
    model = presets.build(name, device="meta")
    assert isinstance(model, UNet2D)
    assert presets.count_parameters(model) == expected
    assert all(p.is_meta for p in model.parameters()), "a meta build must allocate no memory"


def test_t2i_adapter_preset_counts_the_public_checkpoint_on_meta():
    from diffusion_core.models.t2i_adapter import T2IAdapter

    model = presets.build("t2i-adapter-sd15", device="meta")
    assert isinstance(model, T2IAdapter)
    assert presets.count_parameters(model) == 77_369_280  # diffusers T2IAdapter() defaults
    assert all(p.is_meta for p in model.parameters()), "a meta build must allocate no memory"


def test_ip_adapter_preset_counts_the_public_checkpoint_on_meta():
    from diffusion_core.models.ip_adapter import IPAdapter

    model = presets.build("ip-adapter-sd15", device="meta")
    assert isinstance(model, IPAdapter)
    # h94/IP-Adapter models/ip-adapter_sd15: image projection 1024 -> 4 x 768, then K/V for 16 layers
    assert presets.count_parameters(model.image_proj) == 3_150_336
    assert presets.count_parameters(model.ip_adapter) == 19_169_280
    assert presets.count_parameters(model) == 22_319_616
    assert list(model.ip_adapter) == [str(i) for i in range(1, 32, 2)]  # the file's "1.to_k_ip.weight" ... "31."
    assert all(p.is_meta for p in model.parameters()), "a meta build must allocate no memory"


def test_if_stage1_xl_preset_counts_the_public_checkpoint_on_meta():
    from diffusion_core.models.unet_cond import UNet2DCondition

    model = presets.build("if-stage1-xl", device="meta")
    assert isinstance(model, UNet2DCondition)
    assert presets.count_parameters(model) == 4_304_695_110  # DeepFloyd/IF-I-XL-v1.0, unet
    assert all(p.is_meta for p in model.parameters()), "a meta build must allocate no memory"


def test_config_presets_match_the_registered_builders():
    with torch.device("meta"):
        assert presets.count_parameters(UNet2D(UNetConfig.ddpm_cifar10())) == 35_746_307
        assert presets.count_parameters(UNet2D(UNetConfig.ddpm_256())) == 113_673_219


def test_unknown_preset_error_names_the_known_ones():
    with pytest.raises(presets.UnknownPresetError) as info:
        presets.build("ddpm-cifar100")
    message = str(info.value)
    assert "ddpm-cifar100" in message
    assert "ddpm-cifar10" in message and "ddpm-256" in message


def test_t5_xxl_encoder_preset_counts_the_public_checkpoint_on_meta():
    from diffusion_core.models.t5 import T5EncoderModel

    model = presets.build("t5-v1_1-xxl-encoder", device="meta")
    assert isinstance(model, T5EncoderModel)
    # google/t5-v1_1-xxl's encoder (DeepFloyd IF's text_encoder): the 32128 x 4096 embedding is
    # `shared` and `encoder.embed_tokens` at once, counted once
    assert model.encoder.embed_tokens is model.shared
    assert presets.count_parameters(model) == 4_762_310_656
    per_block = 4 * 4096 * 4096 + 3 * 4096 * 10240 + 2 * 4096  # q, k, v, o; wi_0, wi_1, wo; two norms
    assert presets.count_parameters(model.encoder.block[1]) == per_block
    assert 32128 * 4096 + 24 * per_block + 32 * 64 + 4096 == 4_762_310_656  # + relative bias + final norm
    assert all(p.is_meta for p in model.parameters()), "a meta build must allocate no memory"


def test_karlo_prior_preset_counts_diffusers_prior_transformer_on_meta():
    from diffusion_core.models.prior import PriorTransformer

    model = presets.build("karlo-prior", device="meta")
    assert isinstance(model, PriorTransformer)
    # kakaobrain/karlo-v1-alpha, prior: diffusers' PriorTransformer defaults (the conversion script's
    # PRIOR_CONFIG = {}), 20 layers of width 2048 over 77 + 4 slots of 768-wide CLIP ViT-L/14 embeddings
    assert presets.count_parameters(model) == 1_022_030_080
    per_block = 4 * (2048 * 2048 + 2048) + 2 * 2048 * 8192 + 8192 + 2048 + 2 * 2 * 2048  # q k v o, MLP, 2 LNs
    assert presets.count_parameters(model.transformer_blocks[0]) == per_block
    assert all(p.is_meta for p in model.parameters()), "a meta build must allocate no memory"
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        theirs = diffusers.PriorTransformer()
    assert presets.count_parameters(theirs) == 1_022_030_080
    assert {k: tuple(v.shape) for k, v in theirs.state_dict().items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()}
