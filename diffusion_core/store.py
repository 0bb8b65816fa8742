"""The model store: models that several chapters reuse are trained once, by a named recipe, and cached.

A :class:`Recipe` says how to build a model from a JSON-able config and how to train it; the
config depends on the profile (a smoke model is smaller). ``load("digits-ddpm")`` returns the cached
model when a file with the same recipe, version, profile and config exists and its checksum
matches; otherwise it trains the model (with a progress bar) and writes it.

Files are safetensors (tensors only, nothing is ever unpickled) with the recipe, profile, config
and metrics in the header, plus a ``.sha256`` file beside them. Both are written atomically (a
temporary file, then ``os.replace``); a corrupt, truncated or mismatching file (other keys, shapes
or dtypes than the recipe builds) is detected and rebuilt with a warning, and the temporaries of a
writer that was killed are removed. A directory where a file should be is an error (never deleted).
The cache lives in ``$DIFFUSION_CACHE`` (default ``~/.cache/diffusion-from-the-papers``).

With ``$DIFFUSION_STORE_LOG`` set to a file, every load appends one JSON line to it,
``{"recipe", "profile", "event": "loaded" | "trained", "seconds"}``: the book's build sets it to
record which models a chapter trained and which it found cached (:func:`read_log`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import distributed
from .interop import CheckpointMismatchError, load_state_dict
from .profiles import Profile, current

ENV_VAR = "DIFFUSION_CACHE"
LOG_VAR = "DIFFUSION_STORE_LOG"


@dataclass(frozen=True)
class Recipe:
    """A fixed recipe: ``config(profile) -> dict``, ``build(config) -> module``,
    ``train(module, config, profile) -> metrics`` (trains in place; metrics JSON-able)."""

    name: str
    version: int
    config: Callable[[Profile], dict[str, Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    train: Callable[[nn.Module, dict[str, Any], Profile], dict[str, Any]]
    description: str = ""
    #: what it takes to *use* the model, read from its config: its diffusion process
    #: (``config -> GaussianDiffusion``) and its text tokenizer (``config -> tokenizer``), where it has one
    process: Callable[[dict[str, Any]], Any] | None = None
    tokenizer: Callable[[dict[str, Any]], Any] | None = None


# name -> Recipe, or "module:attribute" naming one (imported on first use)
RECIPES: dict[str, Recipe | str] = {
    "digit-classifier": "diffusion_core.evaluate.digits:DIGIT_CLASSIFIER",
    "digits-ddpm": "diffusion_core.recipes.digits:DIGITS_DDPM",
    "digits-ddpm-vlb": "diffusion_core.recipes.digits:DIGITS_DDPM_VLB",
    "digits-iddpm-hybrid": "diffusion_core.recipes.improved:DIGITS_IDDPM_HYBRID",
    "digits-iddpm-hybrid-linear": "diffusion_core.recipes.improved:DIGITS_IDDPM_HYBRID_LINEAR",
    "shapes-vae-f2": "diffusion_core.recipes.latent:SHAPES_VAE_F2",
    "shapes-vae-f4": "diffusion_core.recipes.latent:SHAPES_VAE_F4",
    "shapes-vae-f8": "diffusion_core.recipes.latent:SHAPES_VAE_F8",
    "shapes-vae-f4-kl0.1": "diffusion_core.recipes.latent:SHAPES_VAE_F4_KL01",
    "shapes-ldm-f1": "diffusion_core.recipes.latent:SHAPES_LDM_F1",
    "shapes-ldm-f2": "diffusion_core.recipes.latent:SHAPES_LDM_F2",
    "shapes-ldm-f4": "diffusion_core.recipes.latent:SHAPES_LDM_F4",
    "shapes-ldm-f8": "diffusion_core.recipes.latent:SHAPES_LDM_F8",
    "shapes-ldm-f1-steps": "diffusion_core.recipes.latent:SHAPES_LDM_F1_STEPS",
    "shapes-ldm-f2-steps": "diffusion_core.recipes.latent:SHAPES_LDM_F2_STEPS",
    "shapes-ldm-f4-steps": "diffusion_core.recipes.latent:SHAPES_LDM_F4_STEPS",
    "shapes-ldm-f8-steps": "diffusion_core.recipes.latent:SHAPES_LDM_F8_STEPS",
    "shapes-ldm-t2i": "diffusion_core.recipes.latent:SHAPES_LDM_T2I",
    "shapes-ldm-t2i-p0.2": "diffusion_core.recipes.latent:SHAPES_LDM_T2I_P02",
    "shapes-ldm-t2i-p0.5": "diffusion_core.recipes.latent:SHAPES_LDM_T2I_P05",
    "digits-cfg-p0.1": "diffusion_core.recipes.guidance:DIGITS_CFG_P01",
    "digits-cfg-p0.2": "diffusion_core.recipes.guidance:DIGITS_CFG_P02",
    "digits-cfg-p0.5": "diffusion_core.recipes.guidance:DIGITS_CFG_P05",
    "shapes-attributes": "diffusion_core.evaluate.attributes:SHAPES_ATTRIBUTES",
    "shapes-clip": "diffusion_core.recipes.clip:SHAPES_CLIP",
    "shapes-clip-judge": "diffusion_core.recipes.clip:SHAPES_CLIP_JUDGE",
    "shapes-controlnet-edges": "diffusion_core.recipes.control:CONTROLNET_EDGES",
    "shapes-controlnet-depth": "diffusion_core.recipes.control:CONTROLNET_DEPTH",
    "shapes-t2i-adapter-edges": "diffusion_core.recipes.control:ADAPTER_EDGES",
    "shapes-t2i-adapter-depth": "diffusion_core.recipes.control:ADAPTER_DEPTH",
    "shapes-t2i-adapter-palette": "diffusion_core.recipes.control:ADAPTER_PALETTE",
    "shapes-ip-adapter": "diffusion_core.recipes.ip_adapter:IP_ADAPTER",
    "shapes-ip-concat": "diffusion_core.recipes.ip_adapter:IP_CONCAT",
    "faces-identity": "diffusion_core.evaluate.identity:FACES_IDENTITY",
    "faces-identity-judge": "diffusion_core.evaluate.identity:FACES_IDENTITY_JUDGE",
    "faces-vae-f4": "diffusion_core.recipes.faces:FACES_VAE",
    "faces-ldm-t2i": "diffusion_core.recipes.faces:FACES_T2I",
    "faces-evaluator": "diffusion_core.evaluate.faces:FACES_EVALUATOR",
    "faces-clip": "diffusion_core.recipes.faces:FACES_CLIP",
    "faces-instantid": "diffusion_core.recipes.instantid:INSTANTID",
    "faces-ip-clip": "diffusion_core.recipes.instantid:IP_CLIP",
    "shapes-glide": "diffusion_core.recipes.glide:SHAPES_GLIDE",
    "shapes-clip-noisy": "diffusion_core.recipes.glide:SHAPES_CLIP_NOISY",
    "shapes-glide-inpaint": "diffusion_core.recipes.glide:SHAPES_GLIDE_INPAINT",
    "shapes-unclip-prior": "diffusion_core.recipes.unclip:SHAPES_UNCLIP_PRIOR",
    "shapes-unclip-decoder": "diffusion_core.recipes.unclip:SHAPES_UNCLIP_DECODER",
    "shapes-imagen-minilm": "diffusion_core.recipes.imagen:SHAPES_IMAGEN_MINILM",
    "shapes-imagen-clip": "diffusion_core.recipes.imagen:SHAPES_IMAGEN_CLIP",
    "shapes-imagen-scratch": "diffusion_core.recipes.imagen:SHAPES_IMAGEN_SCRATCH",
    "shapes-imagen-sr": "diffusion_core.recipes.imagen:SHAPES_IMAGEN_SR",
    "shapes-imagen-sr-noaug": "diffusion_core.recipes.imagen:SHAPES_IMAGEN_SR_NOAUG",

}


@dataclass
class Stored:
    """A model from the store, with what it was made from and what was measured when it was."""

    model: nn.Module
    name: str
    profile: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    path: Path
    trained_now: bool

    @property
    def diffusion(self) -> Any:
        """The diffusion process the model was trained with (its recipe's ``process`` of its config), so
        a caller need not go back to ``recipes/`` to interpret the config."""
        return self._from_recipe("process")

    @property
    def tokenizer(self) -> Any:
        """The text tokenizer the model reads captions with (its recipe's ``tokenizer`` of its config)."""
        return self._from_recipe("tokenizer")

    def _from_recipe(self, what: str) -> Any:
        hook = getattr(recipe(self.name), what)
        if hook is None:
            raise AttributeError(f"stored model {self.name!r} has no {'diffusion process' if what == 'process' else what}"
                                 f" (its recipe defines none)")
        return hook(self.config)


def device_of(obj: nn.Module | Stored) -> torch.device:
    """The device a module (or a stored model's module) holds its parameters on (the CPU for a module
    without parameters)."""
    module = obj.model if isinstance(obj, Stored) else obj
    if not isinstance(module, nn.Module):
        raise TypeError(f"device_of takes a module or a Stored model, got {type(obj).__name__}")
    return next(module.parameters(), torch.empty(0)).device


class UnknownRecipeError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


def register(recipe: Recipe) -> Recipe:
    RECIPES[recipe.name] = recipe
    return recipe


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UnknownRecipeError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    entry = RECIPES[name]
    if isinstance(entry, str):
        module_name, attr = entry.split(":")
        entry = getattr(importlib.import_module(module_name), attr)
        RECIPES[name] = entry
    return entry


def cache_dir() -> Path:
    root = os.environ.get(ENV_VAR) or os.path.join(os.path.expanduser("~"), ".cache", "diffusion-from-the-papers")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(r: Recipe, profile_name: str, config: dict[str, Any]) -> str:
    blob = json.dumps({"name": r.name, "version": r.version, "profile": profile_name, "config": config},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def path_for(r: Recipe, profile_name: str, config: dict[str, Any]) -> Path:
    return cache_dir() / f"{r.name}-{profile_name}-{cache_key(r, profile_name, config)}.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save(model: nn.Module, path: Path, metadata: dict[str, Any]) -> None:
    """Write ``model``'s state dict as safetensors with JSON metadata, then its checksum; atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {k: json.dumps(v, sort_keys=True, default=str) for k, v in metadata.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    digest = sha256_file(path)
    _atomic_write(path.with_suffix(".sha256"), lambda tmp: Path(tmp).write_text(digest + "\n"))


def read(path: Path, expected_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a stored file after checking its checksum (and cache key); raises ``ValueError`` if bad."""
    side = path.with_suffix(".sha256")
    if not path.exists() or not side.exists():
        raise ValueError(f"{path.name}: file or checksum missing")
    if sha256_file(path) != side.read_text().strip():
        raise ValueError(f"{path.name}: checksum mismatch (corrupt or partly written)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name}: unreadable safetensors file ({e})") from e
    meta = {k: json.loads(v) for k, v in raw.items()}
    if expected_key is not None and meta.get("key") != expected_key:
        raise ValueError(f"{path.name}: recipe key {meta.get('key')!r} does not match {expected_key!r}")
    return tensors, meta


def _check_not_directories(path: Path) -> None:
    """The store's file and its checksum must be files: a directory in their place is never
    overwritten (it may hold someone's files), so it is an error that says what to remove."""
    for p in (path, path.with_suffix(".sha256")):
        if p.is_dir():
            raise IsADirectoryError(f"[store] {p} is a directory where the store keeps a file; remove it "
                                    f"(or set {ENV_VAR} to another cache folder) and the model is rebuilt")


def _remove_stale_temporaries(path: Path) -> list[str]:
    """Delete the temporary files an interrupted :func:`save` of ``path`` (or of its checksum) left
    behind; called under the entry's lock, when no writer of this entry can be running."""
    prefixes = (f".{path.name}.", f".{path.with_suffix('.sha256').name}.")
    removed = []
    for name in os.listdir(path.parent):
        if name.endswith(".tmp") and name.startswith(prefixes):
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(path.parent / name)
                removed.append(name)
    return removed


def _check_dtypes(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The stored tensors must have the dtypes of the model the recipe builds (a float16 file would
    otherwise be cast silently, its lost precision hidden); raises ``ValueError`` naming the first."""
    own = model.state_dict()
    wrong = [(k, v.dtype, own[k].dtype) for k, v in tensors.items() if k in own and v.dtype != own[k].dtype]
    if wrong:
        k, stored, built = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"{k} is stored as {stored} but the recipe builds {built}{more}")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock so two processes never train the same model at once."""
    lock_path = path.with_suffix(".lock")
    with open(lock_path, "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no lock, still atomic
            pass
        yield


def load(name: str, profile: Profile | str | None = None, device: torch.device | str | None = None,
         rebuild: bool = False, verbose: bool = True) -> Stored:
    """The model of recipe ``name`` for ``profile``: from the cache, or trained now and cached.

    Under ``torchrun`` (several processes; the process group is made from torchrun's environment
    if none exists) every process takes part in training, but only rank 0 takes the lock, reads the
    cached file to decide, prints and writes; the others wait for its file and load it, so every
    process returns the same weights and metrics (:mod:`diffusion_core.distributed`)."""
    from .profiles import check_profile

    if profile is not None and not isinstance(profile, (str, Profile)):
        raise TypeError(f"[store] profile must be a Profile, a profile name or None, got {type(profile).__name__}")
    if isinstance(profile, str):
        prof = current()
        prof = Profile(name=check_profile(profile), device=prof.device, seed=prof.seed)
    else:
        prof = profile or current()
    r = recipe(name)
    config = r.config(prof)
    key = cache_key(r, prof.name, config)
    path = path_for(r, prof.name, config)
    target = torch.device(device) if device is not None else prof.device
    _check_not_directories(path)
    if distributed.init(prof.device):
        return _load_distributed(r, prof, config, key, path, target, rebuild, verbose)
    with _lock(path):
        _remove_stale_temporaries(path)  # a writer killed mid-save leaves its temporary behind
        if not rebuild and path.exists():
            stored = _read_cached(r, prof, config, key, path, target, verbose)
            if stored is not None:
                return stored
        return _train_and_save(r, prof, config, key, path, target, verbose)


def _read_cached(r: Recipe, prof: Profile, config: dict[str, Any], key: str, path: Path, target: torch.device,
                 verbose: bool, strict: bool = False) -> Stored | None:
    """The cached model, or ``None`` with a warning when the file is bad (``strict``: raise instead)."""
    try:
        tensors, meta = read(path, key)
        model = r.build(config)
        _check_dtypes(model, tensors)
        load_state_dict(model, tensors, what=f"stored {r.name}")
    except (ValueError, CheckpointMismatchError) as e:
        if strict:
            raise
        warnings.warn(f"[store] {r.name}: {e}; rebuilding", stacklevel=3)
        return None
    if verbose:
        print(f"[store] {r.name} ({prof.name}): loaded {path.name}")
    if not strict:  # strict: another rank reading rank 0's file, which rank 0 has logged
        _log_event(r, prof, "loaded")
    return Stored(model.to(target).eval(), r.name, prof.name, config, meta.get("metrics", {}), path, False)


def _log_event(r: Recipe, prof: Profile, event: str, seconds: Any = None) -> None:
    """Append one line to ``$DIFFUSION_STORE_LOG`` (when set): what this load did."""
    target = os.environ.get(LOG_VAR)
    if not target:
        return
    line = json.dumps({"recipe": r.name, "profile": prof.name, "event": event,
                       "seconds": float(seconds) if isinstance(seconds, (int, float)) else None})
    with open(target, "a", encoding="utf-8") as f:  # one short write: lines from one process never interleave
        f.write(line + "\n")


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events of a ``$DIFFUSION_STORE_LOG`` file, in order (an absent file: none)."""
    path = Path(path)
    if not path.is_file():
        return []
    events = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"[store] {path}, line {n}: not a JSON object ({exc})") from None
        if not isinstance(e, dict) or e.get("event") not in ("loaded", "trained") or not isinstance(e.get("recipe"), str):
            raise ValueError(f"[store] {path}, line {n}: expected {{recipe, profile, event: loaded|trained}}, got {line!r}")
        events.append(e)
    return events


def _train(r: Recipe, prof: Profile, config: dict[str, Any], verbose: bool) -> tuple[nn.Module, dict[str, Any]]:
    if verbose:
        print(f"[store] {r.name} ({prof.name}): training by recipe v{r.version} (cached for next time)")
    # a model is often first asked for inside a no_grad (or inference_mode) block, by a sampler or an encoder
    # that needs another recipe's model: it must still be built with ordinary tensors and trained with gradients
    with torch.inference_mode(False), torch.enable_grad():
        model = r.build(config)
        start = time.perf_counter()
        metrics = dict(r.train(model, config, prof) or {})
    metrics.setdefault("train_seconds", round(time.perf_counter() - start, 2))
    return model.to("cpu").eval(), metrics


def _save(r: Recipe, prof: Profile, config: dict[str, Any], key: str, path: Path, model: nn.Module,
          metrics: dict[str, Any]) -> None:
    save(model, path, {"recipe": r.name, "version": r.version, "profile": prof.name, "config": config,
                       "metrics": metrics, "key": key, "torch": torch.__version__})


def _train_and_save(r: Recipe, prof: Profile, config: dict[str, Any], key: str, path: Path, target: torch.device,
                    verbose: bool) -> Stored:
    model, metrics = _train(r, prof, config, verbose)
    _save(r, prof, config, key, path, model, metrics)
    _log_event(r, prof, "trained", metrics.get("train_seconds"))
    return Stored(model.to(target), r.name, prof.name, config, metrics, path, True)


def _load_distributed(r: Recipe, prof: Profile, config: dict[str, Any], key: str, path: Path,
                      target: torch.device, rebuild: bool, verbose: bool) -> Stored:
    """:func:`load` under several processes. Rank 0 holds the entry's lock throughout (other jobs
    wait for it; the other ranks of this job never take it, or they would wait for rank 0 forever)
    and decides; every rank trains; rank 0 writes; the others then read the file it wrote."""
    main = distributed.is_main()
    with _lock(path) if main else contextlib.nullcontext():
        found: list[Stored | None] = [None]

        def cached_on_main() -> bool:
            _remove_stale_temporaries(path)
            if not rebuild and path.exists():
                found[0] = _read_cached(r, prof, config, key, path, target, verbose)
            return found[0] is not None

        def read_rank0_file() -> Stored:
            try:
                return _read_cached(r, prof, config, key, path, target, False, strict=True)
            except (ValueError, CheckpointMismatchError) as e:
                raise RuntimeError(f"[store] rank {distributed.rank()} cannot read the file rank 0 checked or "
                                   f"wrote ({e}); on several machines {ENV_VAR} must be a folder they all "
                                   f"share") from e

        if distributed.run_on_main(cached_on_main):  # the others load the file rank 0 found valid
            return found[0] if main else read_rank0_file()
        model, metrics = _train(r, prof, config, verbose and main)
        distributed.run_on_main(lambda: _save(r, prof, config, key, path, model, metrics))  # the others wait
        if main:
            _log_event(r, prof, "trained", metrics.get("train_seconds"))
            return Stored(model.to(target), r.name, prof.name, config, metrics, path, True)
        stored = read_rank0_file()
        stored.trained_now = True
        return stored


def main(argv: list[str] | None = None) -> int:
    """``python -m diffusion_core.store NAME [NAME ...] [--profile P] [--rebuild]``: train (or find)
    recipes' models in the cache, e.g. before a chapter runs. Under ``torchrun --nproc_per_node N``
    the models train on N processes (GPUs, or gloo processes on a CPU); the chapter then loads them."""
    import argparse

    from .profiles import PROFILES, setup

    parser = argparse.ArgumentParser(prog="python -m diffusion_core.store", description=main.__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help="recipes to train or find in the cache")
    parser.add_argument("--profile", default=None, choices=list(PROFILES), help="the compute profile (default: detected)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rebuild", action="store_true", help="train again even when a valid file is cached")
    parser.add_argument("--list", action="store_true", help="list the recipes and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(sorted(RECIPES)))
        return 0
    if not args.names:
        parser.error("name at least one recipe (--list shows them)")
    unknown = [n for n in args.names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; --list shows the known ones")
    prof = setup(args.profile, seed=args.seed, verbose=False)
    distributed.init(prof.device)
    main_rank = distributed.is_main()
    if main_rank:
        print(f"{prof} processes={distributed.world_size()} cache={cache_dir()}")
    for name in args.names:
        stored = load(name, prof, rebuild=args.rebuild, verbose=main_rank)
        if main_rank:
            print(json.dumps({"recipe": name, "profile": stored.profile, "file": stored.path.name,
                              "trained_now": stored.trained_now, "metrics": stored.metrics}, default=str))
    return 0


if __name__ == "__main__":
    from diffusion_core.store import main as _main  # the package's module, not a second copy of it

    raise SystemExit(_main())
