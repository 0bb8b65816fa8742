"""Stable Diffusion 1.5 assembled from this package's own parts (Appendix A).

Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion Models": a frozen text
encoder turns the prompt into token states ``c`` (CLIP ViT-L/14's text tower, chapter 05); a UNet
``eps_theta(z_t, t, c)`` that cross-attends to them (chapter 04) denoises in the latent space of a KL
autoencoder; its decoder maps the final latent to pixels, ``x = D(z_0 / scaling_factor)``.
:func:`text_to_image` samples it as diffusers' ``StableDiffusionPipeline`` does:

* DDIM (Song et al. 2021, eq. 12 with eta = 0 by default) over SD 1.5's scheduler: 1000 training steps
  of the "scaled_linear" schedule (beta from 0.00085 to 0.012), "leading" timesteps with
  ``steps_offset = 1``, the last step landing on alpha_bar_0 (``set_alpha_to_one = False``), no
  clipping (:func:`ddim_scheduler`, :class:`~diffusion_core.schedulers.DDIMEquivalent`);
* classifier-free guidance (Ho & Salimans 2022) in one batched forward pass of ``[negative; prompt]``
  (:func:`~diffusion_core.samplers.guidance.cfg_eps`)::

      eps_hat = eps_theta(z_t, t, c_neg) + s (eps_theta(z_t, t, c) - eps_theta(z_t, t, c_neg))

  with ``s = guidance_scale`` (GLIDE's and diffusers' convention; Ho & Salimans' w = s - 1); the
  negative prompt's states ``c_neg`` are those of the empty prompt unless a negative prompt is given;
* optionally a ControlNet (Zhang et al. 2023, chapter 07), run on both halves of the batch with the
  same condition image, its residuals added to the UNet's skips, and IP-Adapters (Ye et al. 2023,
  chapter 09), loaded into the UNet with :func:`~diffusion_core.interop.load_ip_adapter`, with the
  image embeddings in the conditional half and zeros (or given negative embeddings) in the other.

One difference from diffusers, on purpose: diffusers skips guidance altogether for
``guidance_scale <= 1`` (it runs the conditional model alone), while here every ``s >= 0`` is the
formula above, so ``s = 0`` is the unconditional (negative-prompt) model; the two agree for ``s = 1``
and ``s > 1``.

Not here (diffusers has them): ``num_images_per_prompt`` (repeat the prompts), ``guidance_rescale``,
the ControlNet's ``guess_mode`` and ``control_guidance_start/end``, several ControlNets at once
(:class:`~diffusion_core.models.controlnet.MultiControlNet`), other schedulers than DDIM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .models.clip import CLIPTextModel
from .models.controlnet import ControlNet
from .models.tokenizers import CLIPTokenizer
from .models.unet_cond import UNet2DCondition
from .models.vae import AutoencoderKL
from .samplers.guidance import cfg_eps, check_scale
from .schedulers import DDIMEquivalent, ddim_from_diffusers_config

# The scheduler of stable-diffusion-v1-5 (its scheduler/scheduler_config.json, which diffusers'
# DDIMScheduler.from_config reads): the values that matter for DDIM.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False,
    "clip_sample": False,
}


def ddim_scheduler(config: Mapping[str, Any] | None = None) -> DDIMEquivalent:
    """Our DDIM sampler configured by a diffusers scheduler config (a dict, or a ``scheduler_config.json``'s
    contents, whatever scheduler class it names, as ``DDIMScheduler.from_config`` reads it; no diffusers
    needed): :func:`~diffusion_core.schedulers.ddim_from_diffusers_config`. SD 1.5's when ``config`` is
    None (:data:`SD15_SCHEDULER_CONFIG`)."""
    return ddim_from_diffusers_config(SD15_SCHEDULER_CONFIG if config is None else config)


@dataclass
class StableDiffusion:
    """The parts of Stable Diffusion: ``tokenizer(list of prompts) -> (B, N) ids`` (our
    :class:`~diffusion_core.models.tokenizers.CLIPTokenizer`), the text encoder, the UNet (IP-Adapters,
    if any, loaded in it), the autoencoder, the DDIM scheduler and an optional ControlNet. Parts
    that do not fit together (widths, channels, a ControlNet made for another UNet) are an error
    naming the mismatch."""

    tokenizer: Callable[[list[str]], torch.Tensor]
    text_encoder: CLIPTextModel
    unet: UNet2DCondition
    vae: AutoencoderKL
    scheduler: DDIMEquivalent = field(default_factory=ddim_scheduler)
    controlnet: ControlNet | None = None

    def __post_init__(self) -> None:
        u = self.unet.config
        if self.text_encoder.config.hidden_size != u.cross_attention_dim:
            raise ValueError(f"StableDiffusion: the text encoder's width {self.text_encoder.config.hidden_size} "
                             f"is not the UNet's cross_attention_dim {u.cross_attention_dim}")
        if self.vae.config.latent_channels != u.in_channels or u.out_channels != u.in_channels:
            raise ValueError(f"StableDiffusion: the autoencoder has {self.vae.config.latent_channels} latent channels; "
                             f"the UNet takes {u.in_channels} and predicts {u.out_channels}")
        n = getattr(self.tokenizer, "context_length", None)
        if n is not None and n > self.text_encoder.config.max_position_embeddings:
            raise ValueError(f"StableDiffusion: the tokenizer pads to {n} tokens, the text encoder takes at most "
                             f"{self.text_encoder.config.max_position_embeddings}")
        if self.controlnet is not None:
            self.controlnet.check_fits(self.unet)

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: Callable[[list[str]], torch.Tensor] | None = None,
                        controlnet: ControlNet | None = None) -> StableDiffusion:
        """The parts from a diffusers pipeline folder: ``unet/``, ``vae/``, ``text_encoder/`` (each with
        :func:`~diffusion_core.interop.load_pretrained`), ``scheduler/scheduler_config.json`` (its values
        configure our DDIM) and the tokenizer's ``tokenizer/merges.txt`` (:func:`clip_tokenizer_from_folder`;
        without it, CLIP's BPE file of the ``open_clip_torch`` wheel)."""
        from .interop import load_pretrained, read_config

        path = Path(path)
        sched = path / "scheduler" / "scheduler_config.json"
        if tokenizer is None:
            has_merges = (path / "tokenizer" / "merges.txt").is_file()
            tokenizer = clip_tokenizer_from_folder(path / "tokenizer") if has_merges else CLIPTokenizer.from_default()
        return cls(tokenizer, load_pretrained(path, "text_encoder"), load_pretrained(path, "unet"),
                   load_pretrained(path, "vae"), ddim_scheduler(read_config(sched) if sched.is_file() else None),
                   controlnet)


def clip_tokenizer_from_folder(folder: str | Path) -> CLIPTokenizer:
    """Our CLIP tokenizer from a transformers tokenizer folder (``merges.txt``; ``vocab.json``, when
    present, must be the vocabulary our tokenizer derives from the merges; the context length is
    ``tokenizer_config.json``'s ``model_max_length``, 77 by default). No transformers needed."""
    import json

    folder = Path(folder)
    lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    merges = [line for line in lines[1:] if line.strip()]  # line 0 is the "#version" header
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    length = config.get("model_max_length", 77)  # transformers writes a huge number for "no limit"
    length = length if isinstance(length, int) and length <= 4096 else 77
    tok = CLIPTokenizer(folder / "merges.txt", context_length=length, num_merges=len(merges))
    vocab_file = folder / "vocab.json"
    if vocab_file.is_file() and json.loads(vocab_file.read_text(encoding="utf-8")) != tok.encoder:
        raise ValueError(f"{vocab_file} is not the vocabulary of CLIP's BPE built from {folder / 'merges.txt'} "
                         "(bytes, bytes + </w>, one entry per merge, then <|startoftext|>, <|endoftext|>)")
    return tok


def _prompt_lists(prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The prompts and as many negative prompts ("" when none is given; one string serves them all)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    if negative_prompt is None or isinstance(negative_prompt, str):
        return prompts, [negative_prompt or ""] * len(prompts)
    negatives = list(negative_prompt)
    if not all(isinstance(p, str) for p in negatives):
        raise TypeError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}")
    if len(negatives) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(negatives)} negative prompts: give one negative "
                         "prompt per prompt, or a single string for all of them")
    return prompts, negatives


def encode_prompt(sd: StableDiffusion, prompts: list[str], clip_skip: int = 0) -> torch.Tensor:
    """The token states ``c`` (B, N, D) the UNet cross-attends to: tokenize (padded to the context
    length with the end token), run the text encoder, read its last layer (``clip_skip = 0``)."""
    p = next(sd.text_encoder.parameters())
    ids = sd.tokenizer(prompts).to(p.device)
    return sd.text_encoder.conditioning(ids, clip_skip)


def initial_latents(sd: StableDiffusion, batch: int, height: int | None = None, width: int | None = None,
                    latents: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_T (B, C, H / f, W / f): ``latents`` if given (checked), else standard normal noise drawn from
    ``generator`` (on the generator's device, in float32) as diffusers' ``randn_tensor`` draws it.
    ``height``/``width`` default to the UNet's ``sample_size`` times the autoencoder's factor f."""
    u, f = sd.unet.config, sd.vae.downsampling_factor
    k = f * 2 ** (len(u.block_out_channels) - 1)  # the UNet halves the latent len - 1 times
    if latents is not None:
        want = (batch, u.in_channels)
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or tuple(latents.shape[:2]) != want:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape ({batch}, {u.in_channels}, H/{f}, W/{f}) for {batch} prompt(s), "
                             f"got {got}")
        height, width = height or latents.shape[2] * f, width or latents.shape[3] * f
        if (latents.shape[2] * f, latents.shape[3] * f) != (height, width):
            raise ValueError(f"latents of size {tuple(latents.shape[2:])} decode to {latents.shape[2] * f}x"
                             f"{latents.shape[3] * f} pixels, not the requested {height}x{width}")
    height, width = height or u.sample_size * f, width or u.sample_size * f
    if height % k or width % k:
        raise ValueError(f"height and width must be multiples of {k} (the autoencoder's factor {f} times the "
                         f"UNet's {k // f}), got {height}x{width}")
    if latents is None:
        shape = (batch, u.in_channels, height // f, width // f)
        latents = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents contain NaN or infinity")
    p = next(sd.unet.parameters())
    return latents.to(device=p.device, dtype=p.dtype)


def _per_prompt(x: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``x`` with batch ``batch``: batch 1 is repeated for every prompt; another batch is an error."""
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] not in (1, batch):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a tensor with batch 1 or {batch} (one per prompt), got {got}")
    return x.expand(batch, *x.shape[1:]) if x.shape[0] == 1 else x


def _image_prompts(sd: StableDiffusion, embeds: Sequence[torch.Tensor] | None,
                   negative: Sequence[torch.Tensor] | None, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The IP-Adapter image embeddings of the conditional and the unconditional half, one tensor per
    loaded adapter each; the unconditional ones default to zeros (the "no image" of training)."""
    n = sd.unet.num_ip_adapters
    if embeds is None:
        if n:
            raise ValueError(f"the UNet has {n} IP-Adapter(s) loaded: pass ip_adapter_image_embeds, one tensor per "
                             "adapter (or unload them with interop.unload_ip_adapter)")
        return [], []
    if not n:
        raise ValueError("ip_adapter_image_embeds given, but the UNet has no IP-Adapter loaded (interop.load_ip_adapter)")
    embeds = [embeds] if isinstance(embeds, torch.Tensor) else list(embeds)
    negative = [torch.zeros_like(e) for e in embeds] if negative is None else (
        [negative] if isinstance(negative, torch.Tensor) else list(negative))
    if len(embeds) != n or len(negative) != n:
        raise ValueError(f"{n} IP-Adapter(s) are loaded: give one image embedding tensor per adapter, got "
                         f"{len(embeds)} (and {len(negative)} negative)")
    p = next(sd.unet.parameters())
    cond = [_per_prompt(e, batch, f"ip_adapter_image_embeds[{i}]").to(p.device) for i, e in enumerate(embeds)]
    null = [_per_prompt(e, batch, f"negative_ip_adapter_image_embeds[{i}]").to(p.device) for i, e in enumerate(negative)]
    return cond, null


@torch.no_grad()
def text_to_image(sd: StableDiffusion, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                  *, steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, height: int | None = None,
                  width: int | None = None, latents: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, control_image: torch.Tensor | None = None,
                  controlnet_conditioning_scale: float = 1.0,
                  ip_adapter_image_embeds: Sequence[torch.Tensor] | None = None,
                  negative_ip_adapter_image_embeds: Sequence[torch.Tensor] | None = None, clip_skip: int = 0,
                  output: str = "image", progress: bool = False) -> torch.Tensor:
    """Sample Stable Diffusion: images (B, 3, H, W) in [-1, 1] (``output="image"``), or the final
    latents z_0 (B, 4, H/8, W/8) before decoding (``output="latent"``, diffusers' ``output_type="latent"``).

    ``prompt``: one string or B of them; ``negative_prompt``: None (the empty prompt), one string or
    B. ``latents``: z_T (B, C, H/8, W/8), else drawn from ``generator``. ``control_image``: the
    ControlNet's condition (1 or B, 3, H, W) in [0, 1]. ``ip_adapter_image_embeds``: one tensor per
    loaded IP-Adapter, (1 or B, num_images, D) (plus adapters: (1 or B, num_images, S, D)).
    """
    check_scale(guidance_scale)
    steps = _check_steps(steps, sd.scheduler)
    if output not in ("image", "latent"):
        raise ValueError(f"output must be 'image' or 'latent', got {output!r}")
    if (control_image is None) != (sd.controlnet is None):
        raise ValueError("a ControlNet needs a control_image, and a control_image needs a ControlNet "
                         f"(controlnet: {type(sd.controlnet).__name__}, control_image: {type(control_image).__name__})")
    prompts, negatives = _prompt_lists(prompt, negative_prompt)
    B = len(prompts)
    z_T = initial_latents(sd, B, height, width, latents, generator)

    # the two conditions of classifier-free guidance: c (the prompt) and c_neg (the negative prompt)
    cond = {"context": encode_prompt(sd, prompts, clip_skip)}
    null = {"context": encode_prompt(sd, negatives, clip_skip)}
    cond["image"], null["image"] = _image_prompts(sd, ip_adapter_image_embeds, negative_ip_adapter_image_embeds, B)
    if control_image is not None:  # the same condition image in both halves
        cond["control"] = null["control"] = _per_prompt(control_image, B, "control_image").to(z_T)

    def eps_theta(z: torch.Tensor, t: torch.Tensor, c: dict[str, Any]) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if sd.controlnet is not None:  # ControlNet: residuals for the UNet's skips and middle
            down, mid = sd.controlnet(z, t, c["context"], c["control"], controlnet_conditioning_scale)
            kwargs |= {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        if c["image"]:  # IP-Adapter: image tokens in every cross-attention layer
            kwargs["added_cond_kwargs"] = {"image_embeds": c["image"]}
        return sd.unet(z, t, c["context"], **kwargs)

    def guided(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # eps_hat = eps(z, t, c_neg) + s (eps(z, t, c) - eps(z, t, c_neg)), one forward of batch 2B
        return cfg_eps(eps_theta, z, t, cond, null, guidance_scale)

    z_0 = sd.scheduler.sample(guided, z_T, steps, eta, generator=generator, progress=progress)
    if output == "latent":
        return z_0
    # x = D(z_0 / scaling_factor): the autoencoder's decoder, back from the unit-variance latents
    return sd.vae.decode(z_0 / sd.vae.scaling_factor).clamp(-1.0, 1.0)


def _check_steps(steps: int, scheduler: DDIMEquivalent) -> int:
    T = scheduler.diffusion.T
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer from 1 to the {T} training steps, got {steps!r}")
    return steps


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> [0, 1] (what diffusers' image processor returns for ``output_type="pt"``)."""
    return (images / 2 + 0.5).clamp(0.0, 1.0)


__all__ = ["SD15_SCHEDULER_CONFIG", "StableDiffusion", "clip_tokenizer_from_folder", "ddim_scheduler", "encode_prompt", "initial_latents",
           "text_to_image", "to_unit_range"]
