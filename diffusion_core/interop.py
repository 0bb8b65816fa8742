"""Interoperability with diffusers and transformers: the same weights, the same outputs.

``from_diffusers(obj)`` and ``from_transformers(obj)`` dispatch on the class name of ``obj`` through
the registries below (``"module:function"``, imported lazily); each converter returns the
equivalent diffusion_core object. ``load_state_dict`` is the strict loader they all share: a key
that is missing, unexpected or of the wrong shape is an error that names it.

IP-Adapter files (the official layout ``{"image_proj": ..., "ip_adapter": ...}``) go into a UNet with
``load_ip_adapter``; ``set_ip_adapter_scale`` and ``unload_ip_adapter`` go with it
(:mod:`diffusion_core.models.ip_adapter`).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# diffusers class name -> "module:function(obj) -> diffusion_core object"
DIFFUSERS: dict[str, str] = {
    "UNet2DConditionModel": "diffusion_core.models.unet_cond:from_diffusers_unet_2d_condition",
    "ControlNetModel": "diffusion_core.models.controlnet:from_diffusers_controlnet",
    "MultiControlNetModel": "diffusion_core.models.controlnet:from_diffusers_multi_controlnet",
    "AutoencoderKL": "diffusion_core.models.vae:from_diffusers_autoencoder_kl",
    "UNet2DModel": "diffusion_core.models.unet:from_diffusers_unet2d",
    "DDPMScheduler": "diffusion_core.schedulers:from_diffusers_ddpm_scheduler",
    "DDIMScheduler": "diffusion_core.schedulers:from_diffusers_ddim_scheduler",
    "T2IAdapter": "diffusion_core.models.t2i_adapter:from_diffusers_t2i_adapter",
    "MultiAdapter": "diffusion_core.models.t2i_adapter:from_diffusers_multi_adapter",
    "UnCLIPTextProjModel": "diffusion_core.models.unclip:from_diffusers_unclip_text_proj",
}

# transformers class name -> "module:function(obj) -> diffusion_core object"
TRANSFORMERS: dict[str, str] = {
    "CLIPTextModel": "diffusion_core.models.clip:text_model_from_transformers",
    "CLIPTextModelWithProjection": "diffusion_core.models.clip:text_model_with_projection_from_transformers",
    "CLIPVisionModel": "diffusion_core.models.clip:vision_model_from_transformers",
    "CLIPVisionModelWithProjection": "diffusion_core.models.clip:vision_model_with_projection_from_transformers",
    "CLIPModel": "diffusion_core.models.clip:clip_model_from_transformers",
    "BertModel": "diffusion_core.models.bert:bert_from_transformers",
    "T5EncoderModel": "diffusion_core.models.t5:t5_encoder_from_transformers",
}


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes do not match the model."""


def _dispatch(registry: dict[str, str], obj: Any, library: str) -> Any:
    name = type(obj).__name__
    if name not in registry:
        raise TypeError(
            f"from_{library} does not know {name}; it converts: {', '.join(sorted(registry)) or 'nothing yet'}"
        )
    module_name, fn_name = registry[name].split(":")
    return getattr(importlib.import_module(module_name), fn_name)(obj)


def from_diffusers(obj: Any) -> Any:
    """Convert a diffusers model or scheduler into the equivalent diffusion_core object."""
    return _dispatch(DIFFUSERS, obj, "diffusers")


def from_transformers(obj: Any) -> Any:
    """Convert a transformers model into the equivalent diffusion_core module."""
    return _dispatch(TRANSFORMERS, obj, "transformers")


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str = "checkpoint") -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; raise :class:`CheckpointMismatchError` naming
    every missing key, unexpected key and shape mismatch (at most 10 of each are listed)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: {tuple(state_dict[k].shape)} in the {what}, {tuple(own[k].shape)} in the model"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
            if items:
                more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:10])}{more}")
        raise CheckpointMismatchError(f"{what} does not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def load_safetensors(model: nn.Module, path: str | Path, *, prefix: str = "") -> nn.Module:
    """Load a ``.safetensors`` file into ``model`` strictly (keys under ``prefix`` only, prefix removed).
    Safetensors holds tensors only, so nothing is unpickled."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: only .safetensors files are loaded (pickled .bin/.ckpt files never are)")
    state = load_file(str(path))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointMismatchError(f"{path.name} has no keys under the prefix {prefix!r}")
    return load_state_dict(model, state, what=path.name)


def read_config(config_file: str | Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict; a file that is not a JSON object is a
    ``ValueError`` that names it (and the line and column where the JSON breaks)."""
    import json

    config_file = Path(config_file)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                         "the file is damaged: save the model again or download the file again") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{config_file} is not a UTF-8 text file ({e.reason}); the file is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object ({{...}}), got a JSON {type(config).__name__}")
    return config


def _check_loading_info(folder: Path, name: str, info: Mapping[str, Any]) -> None:
    """Refuse a checkpoint the library loaded only in part: a weight that is missing from the files
    (which the library would leave randomly initialised, only logging it) or of the wrong shape is a
    :class:`CheckpointMismatchError` naming it; keys the model does not use are a warning."""
    import warnings

    def names(items: Any) -> list[str]:
        return sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in (items or []))

    def listed(items: list[str]) -> str:
        more = f" (and {len(items) - 10} more)" if len(items) > 10 else ""
        return ", ".join(items[:10]) + more

    missing, mismatched = names(info.get("missing_keys")), names(info.get("mismatched_keys"))
    errors = [str(e) for e in info.get("error_msgs") or []]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {listed(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {listed(mismatched)}")
    if errors:
        parts.append("; ".join(errors))
    if parts:
        raise CheckpointMismatchError(f"the weights in {folder} do not match its {name}: " + "; ".join(parts)
                                      + " (a damaged or incomplete checkpoint: its weights would be random)")
    unexpected = names(info.get("unexpected_keys"))
    if unexpected:
        warnings.warn(f"{folder}: {len(unexpected)} weights that {name} does not use were ignored: "
                      f"{listed(unexpected)}", stacklevel=3)


# diffusers classes that its top level does not export: where they live (newest diffusers last)
_DIFFUSERS_CLASS_MODULES: dict[str, tuple[str, ...]] = {
    "UnCLIPTextProjModel": ("diffusers.pipelines.unclip.text_proj", "diffusers.pipelines.deprecated.unclip.text_proj"),
}


def _diffusers_class(diffusers: Any, name: str) -> Any:
    """The diffusers class called ``name`` (its top level, or the modules listed above), or None."""
    if hasattr(diffusers, name):
        return getattr(diffusers, name)
    for module in _DIFFUSERS_CLASS_MODULES.get(name, ()):
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return None


def load_pretrained(path: str | Path, subfolder: str | None = None) -> Any:
    """Load a diffusers or transformers model folder saved on disk (``config.json`` + safetensors)
    and return the equivalent diffusion_core module with the same weights.

    The folder's ``config.json`` says which class it holds (diffusers: ``_class_name``; transformers:
    ``architectures``); the library's own ``from_pretrained`` reads it with ``use_safetensors=True``
    (offline: a local folder needs no network) and the registry above converts it. A pipeline folder
    takes ``subfolder="unet"``, ``"vae"`` or ``"text_encoder"``.

    The load is strict, as :func:`load_state_dict` is: a weight the files lack or hold with another
    shape is a :class:`CheckpointMismatchError` naming it (the libraries themselves would initialise
    it at random and only log that); a ``config.json`` that is not a JSON object is a ``ValueError``
    naming the file.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder}; for a pipeline folder pass subfolder='unet' (or 'vae', ...)")
    config = read_config(config_file)
    if "_class_name" in config:
        import diffusers

        name = config["_class_name"]
        cls = _diffusers_class(diffusers, name) if name in DIFFUSERS else None
        if cls is None:
            raise TypeError(f"{folder} holds a diffusers {name}; loadable: {', '.join(sorted(DIFFUSERS))}")
        if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):  # a scheduler: no weights
            return from_diffusers(cls.from_pretrained(str(folder)))
        # low_cpu_mem_usage=False: the weights are loaded into a built model, so a missing one is
        # reported in the loading info (on accelerate's meta-device path it is an obscure error)
        ref, info = cls.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False,
                                        output_loading_info=True)
        _check_loading_info(folder, name, info)
        return from_diffusers(ref)
    if config.get("architectures"):
        import transformers

        name = config["architectures"][0]
        if name not in TRANSFORMERS or not hasattr(transformers, name):
            raise TypeError(f"{folder} holds a transformers {name}; loadable: {', '.join(sorted(TRANSFORMERS))}")
        ref, info = getattr(transformers, name).from_pretrained(str(folder), use_safetensors=True,
                                                                output_loading_info=True)
        _check_loading_info(folder, name, info)
        return from_transformers(ref)
    raise ValueError(f"{config_file} names neither a diffusers class (_class_name) nor transformers architectures")


def load_ip_adapter(unet: nn.Module, state_dict: Any, scale: float | Any = 1.0) -> nn.Module:
    """Load one IP-Adapter (a state dict in the official layout ``{"image_proj": {...}, "ip_adapter":
    {"1.to_k_ip.weight", ...}}``, flat or nested, or an official ``.safetensors`` path) or a list of
    them into a :class:`~diffusion_core.models.unet_cond.UNet2DCondition`, strictly (a missing,
    unexpected or wrongly shaped key is a :class:`CheckpointMismatchError` naming it); base and plus
    (Resampler) layouts. The UNet then takes ``added_cond_kwargs={"image_embeds": [...]}``. See
    :func:`diffusion_core.models.ip_adapter.load_ip_adapter`."""
    from .models.ip_adapter import load_ip_adapter as load

    return load(unet, state_dict, scale)


def set_ip_adapter_scale(unet: nn.Module, scale: float | Any) -> None:
    """The image prompt's weight lambda (IP-Adapter eq. 5): one number for every loaded adapter or
    one per adapter; 0 gives the text-only UNet exactly."""
    from .models.ip_adapter import set_ip_adapter_scale as set_scale

    set_scale(unet, scale)


def unload_ip_adapter(unet: nn.Module) -> nn.Module:
    """Remove the loaded IP-Adapter(s): the default attention processors and no image projection."""
    from .models.ip_adapter import unload_ip_adapter as unload

    return unload(unet)
