"""Stable Diffusion from our own parts (diffusion_core.pipelines) against diffusers' pipelines.

Tiny random models with every weight perturbed (a UNet2DConditionModel, an AutoencoderKL, a
transformers CLIPTextModel with a CLIP BPE tokenizer cut to its first merges), converted with
``interop.from_diffusers`` / ``from_transformers``; the same DDIM scheduler config (SD 1.5's), the
same starting latents, a few steps with guidance: the same latents out, and the same decoded images.
Then with a ControlNet (``StableDiffusionControlNetPipeline``), with an IP-Adapter in the official
layout (loaded into diffusers' UNet with ``_load_ip_adapter_weights``, into ours with
``interop.load_ip_adapter``), and with both at once."""

from __future__ import annotations

import json
import math

import pytest
import torch
from parity_utils import perturb

from diffusion_core import interop, pipelines
from diffusion_core.models import tokenizers as tok
from diffusion_core.pipelines import SD15_SCHEDULER_CONFIG, StableDiffusion, ddim_scheduler, text_to_image

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
CROSS = 32  # the text encoder's width = the UNet's cross_attention_dim
CONTEXT = 16  # the tokenizer's context length
MERGES = 300  # the first 300 merges of CLIP's BPE file: a 814-entry vocabulary
EMBED = 20  # the IP-Adapter's image embedding width
PROMPTS = ["a red circle above a blue square", "two small green triangles"]
NEGATIVES = ["blurry", "a yellow star"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Our CLIP tokenizer and transformers' built from the same vocabulary and merges."""
    try:
        ours = tok.CLIPTokenizer(tok.default_bpe_path(), context_length=CONTEXT, num_merges=MERGES)
    except (FileNotFoundError, ImportError) as e:
        pytest.skip(str(e))
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.json").write_text(json.dumps(ours.encoder), encoding="utf-8")
    merges = sorted(ours.bpe_ranks, key=ours.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    transformers.logging.set_verbosity_error()
    theirs = transformers.CLIPTokenizer.from_pretrained(str(folder), model_max_length=CONTEXT)
    assert theirs(PROMPTS, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"] == \
        ours(PROMPTS).tolist()
    return ours, theirs


def _reference_parts(vocab_size: int, end_id: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=CROSS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=2).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16).eval()
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CONTEXT, bos_token_id=end_id - 1, eos_token_id=end_id, pad_token_id=end_id)).eval()
    for i, m in enumerate((unet, vae, text)):
        perturb(m, 10 * seed + i)
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": diffusers.DDIMScheduler(**SD15_SCHEDULER_CONFIG)}


def _controlnet(unet):
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    perturb(net, 7)  # the zero convolutions too: the residuals matter
    return net


def _ours(parts: dict, tokenizer, controlnet=None) -> StableDiffusion:
    return StableDiffusion(tokenizer, interop.from_transformers(parts["text_encoder"]),
                           interop.from_diffusers(parts["unet"]).eval(), interop.from_diffusers(parts["vae"]).eval(),
                           ddim_scheduler(parts["scheduler"].config),
                           None if controlnet is None else interop.from_diffusers(controlnet).eval())


def _official_ip_adapter(unet, seed: int = 3) -> dict:
    """A base IP-Adapter in the official layout for the diffusers UNet ``unet``."""
    g = torch.Generator().manual_seed(seed)
    image_proj = {"proj.weight": 0.2 * torch.randn(4 * CROSS, EMBED, generator=g),
                  "proj.bias": 0.2 * torch.randn(4 * CROSS, generator=g),
                  "norm.weight": 1 + 0.2 * torch.randn(CROSS, generator=g), "norm.bias": 0.2 * torch.randn(CROSS, generator=g)}
    ip = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip[f"{i}.to_k_ip.weight"] = 0.2 * torch.randn(width, CROSS, generator=g)
            ip[f"{i}.to_v_ip.weight"] = 0.2 * torch.randn(width, CROSS, generator=g)
    return {"image_proj": image_proj, "ip_adapter": ip}


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _latents(seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def parts(tokenizers):
    ours_tok, _ = tokenizers
    return _reference_parts(ours_tok.vocab_size, ours_tok.end_id)


def _pipeline(parts: dict, tokenizer, cls_name: str = "StableDiffusionPipeline", **extra):
    pipe = getattr(diffusers, cls_name)(tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False, **parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_text_to_image_matches_stable_diffusion_pipeline_in_latents_and_images(parts, tokenizers, guidance):
    ours_tok, theirs_tok = tokenizers
    sd = _ours(parts, ours_tok)
    pipe = _pipeline(parts, theirs_tok)
    z_T = _latents()
    kw = dict(num_inference_steps=3, guidance_scale=guidance, latents=z_T.clone())
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=NEGATIVES, output_type="latent", **kw).images
        ref_images = pipe(PROMPTS, negative_prompt=NEGATIVES, output_type="pt", **kw).images
    got = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=guidance, latents=z_T, output="latent")
    assert _max_error(ref, got) <= TOL * ref.abs().max().item()
    assert _max_error(ref, z_T) > 0.1  # three steps moved the latents
    images = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=guidance, latents=z_T)
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert _max_error(ref_images, pipelines.to_unit_range(images)) <= TOL
    if guidance > 1:  # the negative prompts take part: the empty ones give other latents
        other = text_to_image(sd, PROMPTS, steps=3, guidance_scale=guidance, latents=z_T, output="latent")
        assert _max_error(other, got) > 1e-2


def test_the_same_generator_gives_the_same_noise_as_diffusers(parts, tokenizers):
    ours_tok, theirs_tok = tokenizers
    sd = _ours(parts, ours_tok)
    pipe = _pipeline(parts, theirs_tok)
    with torch.no_grad():
        ref = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=3.0, output_type="latent", eta=0.5,
                   generator=torch.Generator().manual_seed(4)).images
    got = text_to_image(sd, PROMPTS[0], steps=2, guidance_scale=3.0, eta=0.5, output="latent",
                        generator=torch.Generator().manual_seed(4))
    assert _max_error(ref, got) <= TOL * ref.abs().max().item()


def test_with_a_controlnet_matches_the_controlnet_pipeline(parts, tokenizers):
    ours_tok, theirs_tok = tokenizers
    net = _controlnet(parts["unet"])
    sd = _ours(parts, ours_tok, net)
    pipe = _pipeline(parts, theirs_tok, "StableDiffusionControlNetPipeline", controlnet=net)
    control = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    z_T = _latents()
    with torch.no_grad():
        ref = pipe(PROMPTS, control, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=4.0,
                   controlnet_conditioning_scale=0.8, latents=z_T.clone(), output_type="latent").images
    got = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T, control_image=control,
                        controlnet_conditioning_scale=0.8, output="latent")
    assert _max_error(ref, got) <= TOL * ref.abs().max().item()
    plain = text_to_image(_ours(parts, ours_tok), PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T,
                          output="latent")
    assert _max_error(plain, got) > 1e-2  # the ControlNet's residuals count


@pytest.mark.parametrize("with_controlnet", [False, True])
def test_with_an_ip_adapter_matches_diffusers_given_the_image_embeds(parts, tokenizers, with_controlnet):
    ours_tok, theirs_tok = tokenizers
    net = _controlnet(parts["unet"]) if with_controlnet else None
    sd = _ours(parts, ours_tok, net)
    official = _official_ip_adapter(parts["unet"])
    parts["unet"]._load_ip_adapter_weights([{k: dict(v) for k, v in official.items()}], low_cpu_mem_usage=False)
    interop.load_ip_adapter(sd.unet, official)
    if with_controlnet:
        control = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
        pipe = _pipeline(parts, theirs_tok, "StableDiffusionControlNetPipeline", controlnet=net, image_encoder=None)
        args, extra = (PROMPTS, control), {"control_image": control}
    else:
        pipe = _pipeline(parts, theirs_tok, image_encoder=None)
        args, extra = (PROMPTS,), {}
    g = torch.Generator().manual_seed(6)
    # one image prompt for both prompts: diffusers repeats the embeddings it is given for every prompt
    e, e_neg = torch.randn(1, 1, EMBED, generator=g), torch.randn(1, 1, EMBED, generator=g)
    z_T = _latents()
    with torch.no_grad():
        # diffusers takes [negative; positive] stacked along the batch when guiding
        ref = pipe(*args, negative_prompt=NEGATIVES, num_inference_steps=3, guidance_scale=4.0, latents=z_T.clone(),
                   ip_adapter_image_embeds=[torch.cat([e_neg, e])], output_type="latent").images
    got = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T, output="latent",
                        ip_adapter_image_embeds=[e], negative_ip_adapter_image_embeds=[e_neg], **extra)
    assert _max_error(ref, got) <= TOL * ref.abs().max().item()
    zeros = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T, output="latent",
                          ip_adapter_image_embeds=[e], **extra)
    assert _max_error(zeros, got) > 1e-2  # the negative image embeddings take part (zeros by default)
    # one image prompt per prompt: the first prompt's sample is the shared-image one, the second's is not
    per_prompt = text_to_image(sd, PROMPTS, NEGATIVES, steps=3, guidance_scale=4.0, latents=z_T, output="latent",
                               ip_adapter_image_embeds=[torch.cat([e, -e])],
                               negative_ip_adapter_image_embeds=[e_neg], **extra)
    assert _max_error(per_prompt[:1], got[:1]) <= 1e-5 and _max_error(per_prompt[1:], got[1:]) > 1e-2


def test_ddim_scheduler_reads_sd15s_released_scheduler_config_as_diffusers_does():
    # stable-diffusion-v1-5's scheduler/scheduler_config.json names the PNDMScheduler it was released with;
    # DDIMScheduler.from_config reads its values (and its defaults for what it leaves out)
    released = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                "clip_sample": False}
    ref = interop.from_diffusers(diffusers.DDIMScheduler.from_config(released))
    for ours in (ddim_scheduler(released), ddim_scheduler()):
        assert torch.equal(ours.diffusion.alpha_bar, ref.diffusion.alpha_bar)
        assert ours.timesteps(4).tolist() == ref.timesteps(4).tolist() == [751, 501, 251, 1]
        assert ours.final_alpha_bar == ref.final_alpha_bar < 1 and ours.threshold.method == "none"
    assert ddim_scheduler({}).steps_offset == 0 and ddim_scheduler({}).final_alpha_bar == 1.0  # DDIMScheduler's defaults


# ---------------------------------------------------------------- bad input: clear errors


@pytest.fixture
def sd(parts, tokenizers):
    return _ours(parts, tokenizers[0])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"negative_prompt": ["a", "b", "c"]}, ValueError, "2 prompts but 3 negative prompts"),
    ({"prompt": []}, TypeError, "non-empty list of strings"),
    ({"prompt": ["ok", 3]}, TypeError, "list of strings"),
    ({"latents": torch.randn(3, 4, 8, 8)}, ValueError, r"latents must have shape \(2, 4"),
    ({"latents": torch.randn(2, 3, 8, 8)}, ValueError, r"latents must have shape \(2, 4"),
    ({"latents": torch.randn(2, 4, 8, 8), "height": 32}, ValueError, "not the requested 32x16"),
    ({"latents": torch.full((2, 4, 8, 8), math.nan)}, ValueError, "NaN"),
    ({"height": 18, "width": 16}, ValueError, "multiples of 4"),
    ({"guidance_scale": -1.0}, ValueError, "guidance scale"),
    ({"guidance_scale": math.nan}, ValueError, "guidance scale"),
    ({"steps": 0}, ValueError, "steps must be an integer from 1"),
    ({"output": "pil"}, ValueError, "output must be"),
    ({"control_image": torch.rand(2, 3, 16, 16)}, ValueError, "a control_image needs a ControlNet"),
    ({"ip_adapter_image_embeds": [torch.randn(2, 1, EMBED)]}, ValueError, "no IP-Adapter loaded"),
])
def test_bad_input_is_an_error_that_names_it(sd, kwargs, error, match):
    kwargs = {"prompt": PROMPTS, "steps": 2, **kwargs}
    with pytest.raises(error, match=match):
        text_to_image(sd, **kwargs)


def test_parts_that_do_not_fit_are_errors(parts, tokenizers):
    ours_tok = tokenizers[0]
    sd = _ours(parts, ours_tok)
    other = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 16), layers_per_block=1, cross_attention_dim=CROSS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=2)
    foreign = interop.from_diffusers(diffusers.ControlNetModel.from_unet(other, conditioning_embedding_out_channels=(8, 16)))
    with pytest.raises(ValueError, match="ControlNet was built for another UNet: its block_out_channels"):
        StableDiffusion(ours_tok, sd.text_encoder, sd.unet, sd.vae, controlnet=foreign)
    with pytest.raises(ValueError, match="text encoder's width"):
        StableDiffusion(ours_tok, sd.text_encoder, interop.from_diffusers(other.__class__(
            sample_size=8, block_out_channels=(16, 32), layers_per_block=1, cross_attention_dim=24, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=2)), sd.vae)
    long_tok = tok.CLIPTokenizer(tok.default_bpe_path(), context_length=CONTEXT + 1, num_merges=MERGES)
    with pytest.raises(ValueError, match="the tokenizer pads to 17 tokens, the text encoder takes at most 16"):
        StableDiffusion(long_tok, sd.text_encoder, sd.unet, sd.vae)
    net = _controlnet(parts["unet"])
    with_net = _ours(parts, ours_tok, net)
    with pytest.raises(ValueError, match="a ControlNet needs a control_image"):
        text_to_image(with_net, PROMPTS, steps=2)
    with pytest.raises(ValueError, match=r"control_image must be a tensor with batch 1 or 2"):
        text_to_image(with_net, PROMPTS, steps=2, control_image=torch.rand(3, 3, 16, 16))
    with pytest.raises(ValueError, match=r"controlnet_cond has shape"):
        text_to_image(with_net, PROMPTS, steps=2, control_image=torch.rand(1, 3, 8, 8))
    interop.load_ip_adapter(sd.unet, _official_ip_adapter(parts["unet"]))
    with pytest.raises(ValueError, match="1 IP-Adapter\\(s\\) loaded: pass ip_adapter_image_embeds"):
        text_to_image(sd, PROMPTS, steps=2)
    with pytest.raises(ValueError, match="one image embedding tensor per adapter, got 2"):
        text_to_image(sd, PROMPTS, steps=2, ip_adapter_image_embeds=[torch.randn(2, 1, EMBED)] * 2)


def _write_tokenizer_files(tokenizer, folder) -> None:
    """vocab.json, merges.txt and tokenizer_config.json as a transformers CLIP tokenizer folder holds them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tokenizer.encoder), encoding="utf-8")
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": CONTEXT}), encoding="utf-8")


def test_clip_tokenizer_from_folder_reads_merges_and_checks_the_vocabulary(tokenizers, tmp_path):
    ours_tok, theirs_tok = tokenizers
    _write_tokenizer_files(ours_tok, tmp_path)
    tok_from_folder = pipelines.clip_tokenizer_from_folder(tmp_path)
    assert tok_from_folder.context_length == CONTEXT and tok_from_folder.vocab_size == ours_tok.vocab_size
    assert torch.equal(tok_from_folder(PROMPTS + NEGATIVES), ours_tok(PROMPTS + NEGATIVES))
    vocab = dict(ours_tok.encoder)
    vocab["a</w>"], vocab["b</w>"] = vocab["b</w>"], vocab["a</w>"]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="vocab.json is not the vocabulary"):
        pipelines.clip_tokenizer_from_folder(tmp_path)


def test_from_pretrained_loads_a_saved_pipeline_folder_and_samples_the_same(parts, tokenizers, tmp_path):
    ours_tok, theirs_tok = tokenizers
    _pipeline(parts, theirs_tok).save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    _write_tokenizer_files(ours_tok, tmp_path / "tokenizer")  # SD 1.5's folder holds these files
    loaded = StableDiffusion.from_pretrained(tmp_path)
    assert torch.equal(loaded.tokenizer(PROMPTS), ours_tok(PROMPTS))
    # the saved scheduler config is read into our DDIM: SD 1.5's options
    assert loaded.scheduler.timesteps(4).tolist() == [751, 501, 251, 1]
    assert loaded.scheduler.final_alpha_bar < 1
    z_T = _latents()
    a = text_to_image(_ours(parts, ours_tok), PROMPTS, NEGATIVES, steps=2, guidance_scale=3.0, latents=z_T)
    b = text_to_image(loaded, PROMPTS, NEGATIVES, steps=2, guidance_scale=3.0, latents=z_T)
    assert torch.equal(a, b)
