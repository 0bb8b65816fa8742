"""Named full-size configurations of the papers' models, built on any device.

``build("ddpm-cifar10", device="meta")`` builds the google/ddpm-cifar10-32 UNet without allocating
memory, so its parameters can be counted against the public checkpoint.

Each entry of :data:`PRESETS` maps a name to ``"module:function"``; the function takes no
arguments and returns an ``nn.Module``. Modules add their presets here in one line each.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

# name -> "diffusion_core.<module>:<builder>" (imported lazily so `presets` stays cheap to import)
PRESETS: dict[str, str] = {
    "sd15-unet": "diffusion_core.models.unet_cond:sd15_unet",
    "controlnet-sd15": "diffusion_core.models.controlnet:controlnet_sd15",
    "sd15-vae": "diffusion_core.models.vae:sd15_vae",
    "ddpm-cifar10": "diffusion_core.models.unet:build_ddpm_cifar10",
    "ddpm-256": "diffusion_core.models.unet:build_ddpm_256",
    "clip-vit-l14-text": "diffusion_core.models.clip:clip_vit_l14_text",
    "clip-vit-l14-vision": "diffusion_core.models.clip:clip_vit_l14_vision",
    "clip-vit-l14": "diffusion_core.models.clip:clip_vit_l14",
    "t2i-adapter-sd15": "diffusion_core.models.t2i_adapter:t2i_adapter_sd15",
    "ip-adapter-sd15": "diffusion_core.models.ip_adapter:ip_adapter_sd15",
    "t5-v1_1-xxl-encoder": "diffusion_core.models.t5:t5_v1_1_xxl_encoder",
    "if-stage1-xl": "diffusion_core.models.unet_cond:if_stage1_xl_unet",
    "karlo-decoder": "diffusion_core.models.unet_cond:karlo_decoder_unet",
    "karlo-prior": "diffusion_core.models.prior:karlo_prior",
}


class UnknownPresetError(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def names() -> list[str]:
    return sorted(PRESETS)


def build(name: str, device: str | torch.device = "meta") -> nn.Module:
    """Build the named full-size configuration on ``device`` (``meta``: no memory)."""
    if name not in PRESETS:
        raise UnknownPresetError(f"unknown preset {name!r}; known presets: {', '.join(names())}")
    module_name, fn_name = PRESETS[name].split(":")
    builder = getattr(importlib.import_module(module_name), fn_name)
    with torch.device(device):
        model = builder()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
