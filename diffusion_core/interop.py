"""Interoperability with diffusers and transformers: the same weights, the same outputs.

``from_diffusers(obj)`` and ``from_transformers(obj)`` dispatch on the class name of ``obj`` through
the registries below (``"module:function"``, imported lazily); each converter returns the
equivalent diffusion_core object. ``load_state_dict`` is the strict loader they all share: a key
that is missing, unexpected or of the wrong shape is an error that names it.

``load_pretrained(folder)`` reads a model folder saved by either library (``config.json`` and
safetensors weights, sharded or not) straight into our classes, with neither library imported:
the folder's class name selects a builder in :data:`FROM_CONFIG` (a config dict -> our untrained
module; the object converters above read their configs through the very same functions), and the
weights go through :func:`load_state_dict`. To make another class loadable from a folder, register
its config-dict builder there (and, if its files need a harmless key adjustment, a strict loader in
:data:`CHECKPOINT_LOADERS`).

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
    "PriorTransformer": "diffusion_core.models.prior:from_diffusers_prior_transformer",
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


# class name in a model folder's config.json (diffusers: ``_class_name``; transformers:
# ``architectures[0]``) -> "module:function(config: dict) -> our module, untrained"; load_pretrained
# builds it and then loads the folder's weights into it
FROM_CONFIG: dict[str, str] = {
    "UNet2DConditionModel": "diffusion_core.models.unet_cond:unet_2d_condition_from_diffusers_config",
    "ControlNetModel": "diffusion_core.models.controlnet:controlnet_from_diffusers_config",
    "AutoencoderKL": "diffusion_core.models.vae:autoencoder_kl_from_diffusers_config",
    "UNet2DModel": "diffusion_core.models.unet:unet2d_from_diffusers_config",
    "T2IAdapter": "diffusion_core.models.t2i_adapter:t2i_adapter_from_diffusers_config",
    "UnCLIPTextProjModel": "diffusion_core.models.unclip:unclip_text_proj_from_diffusers_config",
    "PriorTransformer": "diffusion_core.models.prior:prior_from_diffusers_config",
    "CLIPTextModel": "diffusion_core.models.clip:text_model_from_transformers_config",
    "CLIPTextModelWithProjection": "diffusion_core.models.clip:text_model_with_projection_from_transformers_config",
    "CLIPVisionModel": "diffusion_core.models.clip:vision_model_from_transformers_config",
    "CLIPVisionModelWithProjection": "diffusion_core.models.clip:vision_model_with_projection_from_transformers_config",
    "CLIPModel": "diffusion_core.models.clip:clip_model_from_transformers_config",
    "BertModel": "diffusion_core.models.bert:bert_from_transformers_config",
    "T5EncoderModel": "diffusion_core.models.t5:t5_encoder_from_transformers_config",
}

# scheduler class name in a scheduler_config.json -> "module:function(config: dict) -> our equivalent"
# (no weights to load)
SCHEDULERS_FROM_CONFIG: dict[str, str] = {
    "DDPMScheduler": "diffusion_core.schedulers:ddpm_from_diffusers_config",
    "DDIMScheduler": "diffusion_core.schedulers:ddim_from_diffusers_config",
}

# class name -> "module:function(model, state_dict, *, what) -> model", a strict loader for files whose
# keys need a harmless adjustment first (CLIP: stale position_ids buffers, a bare tower's missing
# prefix); classes not listed load with load_state_dict itself
CHECKPOINT_LOADERS: dict[str, str] = {
    **{name: "diffusion_core.models.clip:load_clip_state_dict"
       for name in ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPVisionModel",
                    "CLIPVisionModelWithProjection", "CLIPModel")},
    "BertModel": "diffusion_core.models.bert:load_bert_state_dict",  # stale position_ids, a bert. prefix
    "T5EncoderModel": "diffusion_core.models.t5:load_t5_state_dict",  # the tied embedding stored once
}


class CheckpointMismatchError(ValueError):
    """A state dict whose keys or shapes do not match the model."""


def _resolve(target: str) -> Any:
    """The function a registry entry ``"module:function"`` names, imported now."""
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def _dispatch(registry: dict[str, str], obj: Any, library: str) -> Any:
    name = type(obj).__name__
    if name not in registry:
        raise TypeError(
            f"from_{library} does not know {name}; it converts: {', '.join(sorted(registry)) or 'nothing yet'}"
        )
    return _resolve(registry[name])(obj)


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


# the weights' file names: diffusers', then transformers' (each also sharded: <name>.safetensors.index.json)
WEIGHTS_NAMES = ("diffusion_pytorch_model", "model")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")


def _with_variant(filename: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors``; ``model.safetensors.index.json`` ->
    ``model.safetensors.index.fp16.json`` (both libraries put the variant before the last suffix)."""
    if not variant:
        return filename
    head, _, last = filename.rpartition(".")
    return f"{head}.{variant}.{last}"


def _read_index(index_file: Path) -> dict[str, str]:
    """A sharded checkpoint's ``weight_map`` (key -> shard file name), checked."""
    index = read_config(index_file)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file} has no weight_map (key -> shard file): the index is damaged")
    return {str(k): str(v) for k, v in weight_map.items()}


def weights_files(folder: str | Path, variant: str | None = None) -> tuple[list[Path], Path | None]:
    """The safetensors files holding a model folder's weights, and for a sharded checkpoint its
    index file (else None). diffusers' ``diffusion_pytorch_model[.variant].safetensors`` and
    transformers' ``model[.variant].safetensors``, or their ``*.safetensors.index[.variant].json``.

    Pickled weights (``.bin``, ``.ckpt``, ...) are never read: unpickling a file runs whatever code it
    holds. A folder that has only those is a ``FileNotFoundError`` that says so."""
    folder = Path(folder)
    for stem in WEIGHTS_NAMES:
        index_file = folder / _with_variant(f"{stem}.safetensors.index.json", variant)
        if index_file.is_file():
            weight_map = _read_index(index_file)
            shards = sorted(set(weight_map.values()))
            missing = [n for n in shards if not (folder / n).is_file()]
            if missing:
                raise FileNotFoundError(f"{index_file.name} lists shards that {folder} lacks: {', '.join(missing)}")
            return [folder / n for n in shards], index_file
        single = folder / _with_variant(f"{stem}.safetensors", variant)
        if single.is_file():
            return [single], None
    present = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    pickles = [n for n in present if n.endswith(_PICKLE_SUFFIXES)]
    wanted = " or ".join(_with_variant(f"{stem}.safetensors", variant) for stem in WEIGHTS_NAMES)
    if pickles:
        raise FileNotFoundError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); only safetensors are read: this "
            "package never unpickles a checkpoint (unpickling runs whatever code the file holds). Where you "
            "trust the file, re-save it with save_pretrained(..., safe_serialization=True)")
    raise FileNotFoundError(f"no weights in {folder}: expected {wanted} (or a sharded *.safetensors.index.json); "
                            f"found: {', '.join(present) or 'nothing'}")


def read_safetensors(files: list[Path], index_file: Path | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` in one state dict (on the CPU). With a shard index, each key must sit
    in the shard the index names, and no key in two shards. Nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weight_map = _read_index(index_file) if index_file is not None else None
    state: dict[str, torch.Tensor] = {}
    misplaced: list[str] = []
    for f in files:
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e}); the file is damaged or "
                             "incomplete: download or save it again") from None
        twice = sorted(set(part) & set(state))
        if twice:
            raise ValueError(f"{f.name} repeats keys already read from another shard: {', '.join(twice[:10])}")
        if weight_map is not None:
            misplaced += [f"{k} (in {f.name}, indexed in {weight_map.get(k, 'no shard')})"
                          for k in part if weight_map.get(k) != f.name]
        state.update(part)
    if misplaced:
        more = f" (and {len(misplaced) - 10} more)" if len(misplaced) > 10 else ""
        raise ValueError(f"the shard index disagrees with the shards: {', '.join(misplaced[:10])}{more}")
    return state


def load_folder_weights(model: nn.Module, folder: str | Path, *, variant: str | None = None,
                        loader: Any = None) -> nn.Module:
    """Load a model folder's safetensors weights (see :func:`weights_files`) into ``model`` strictly
    with ``loader`` (default :func:`load_state_dict`): every missing, unexpected or misshapen key is
    a :class:`CheckpointMismatchError` naming it. The model takes the dtype of the stored weights."""
    folder = Path(folder)
    files, index_file = weights_files(folder, variant)
    state = read_safetensors(files, index_file)
    dtype = next((v.dtype for v in state.values() if v.is_floating_point()), None)
    if dtype is not None:
        model.to(dtype)
    return (loader or load_state_dict)(model, state, what=str(index_file or files[0]))


def load_pretrained(path: str | Path, subfolder: str | None = None, *, variant: str | None = None) -> Any:
    """Load a diffusers or transformers model folder saved on disk (``config.json`` + safetensors,
    sharded or not) into the equivalent diffusion_core module, in eval mode, with neither library
    imported; or a diffusers scheduler folder (``scheduler_config.json``: DDPM, DDIM) into its
    equivalent (:mod:`diffusion_core.schedulers`).

    The folder's ``config.json`` says which class it holds (diffusers: ``_class_name``; transformers:
    ``architectures``); :data:`FROM_CONFIG` builds our module from that config dict (with the same
    functions the object converters use), and its weights are loaded strictly
    (:func:`load_folder_weights`): a weight the files lack, one they hold that the model has no
    place for, or one of another shape is a :class:`CheckpointMismatchError` naming it. A pipeline
    folder takes ``subfolder="unet"``, ``"vae"`` or ``"text_encoder"``; ``variant="fp16"`` reads
    ``*.fp16.safetensors``. Only safetensors are read, never pickles; a ``config.json`` that is not a
    JSON object is a ``ValueError`` naming the file; an unknown class is a ``TypeError`` listing the
    loadable ones.
    """
    folder = Path(path) / subfolder if subfolder else Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file() and (folder / "scheduler_config.json").is_file():
        config = read_config(folder / "scheduler_config.json")
        name = config.get("_class_name")
        if name not in SCHEDULERS_FROM_CONFIG:
            raise TypeError(f"{folder} holds a diffusers scheduler {name}, which has no converter here; "
                            f"loadable: {', '.join(sorted(SCHEDULERS_FROM_CONFIG))}")
        return _resolve(SCHEDULERS_FROM_CONFIG[name])(config)
    if not config_file.is_file():
        parts = [p.name for p in sorted(folder.iterdir())
                 if (p / "config.json").is_file() or (p / "scheduler_config.json").is_file()] if folder.is_dir() else []
        hint = (f"it is a pipeline folder: pass subfolder= one of {', '.join(parts)}" if parts
                else "for a pipeline folder pass subfolder='unet' (or 'vae', ...)")
        raise FileNotFoundError(f"no config.json in {folder}; {hint}")
    config = read_config(config_file)
    if "_class_name" in config:
        name, library = config["_class_name"], "diffusers"
    elif config.get("architectures"):
        name, library = config["architectures"][0], "transformers"
    else:
        raise ValueError(f"{config_file} names neither a diffusers class (_class_name) nor transformers architectures")
    if name not in FROM_CONFIG:
        raise TypeError(f"{folder} holds a {library} {name}, which has no converter here; loadable from a folder: "
                        f"{', '.join(sorted(FROM_CONFIG))}")
    model = _resolve(FROM_CONFIG[name])(config)
    loader = _resolve(CHECKPOINT_LOADERS[name]) if name in CHECKPOINT_LOADERS else load_state_dict
    return load_folder_weights(model, folder, variant=variant, loader=loader).eval()


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
