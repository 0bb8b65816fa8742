"""Latent Diffusion on the shapes world (chapter 04; Rombach et al. 2022). Later chapters reuse these.

Three kinds of stored models, each trained by a fixed recipe on first use and cached:

* ``shapes-vae-f{f}`` (f = 2, 4, 8): the KL-regularised autoencoder of LDM Sec. 3.1, trained with

      L = |x - D(z)|^2 + lambda_edge |grad x - grad D(z)|^2 + beta_KL KL(q(z|x) || N(0, I)),
      z = mu(x) + sigma(x) eps                                                 (reparameterised)

  (squared errors: the configs' ``rec="l2"``; :func:`vae_loss` also offers L1), every term summed
  over an image and divided by its number of pixel values (C H W), so that ``beta_KL`` is on the
  scale of the LDM code, where both terms are sums per image. Its value is not LDM's: the recipe
  uses ``DEFAULT_BETA_KL = 1e-5``, LDM's KL autoencoders ``kl_weight = 1e-6`` (with an L1 + LPIPS
  reconstruction term, so even one number would not be one trade-off). The paper adds a perceptual
  (LPIPS) and a patch-GAN term to keep reconstructions sharp; the error on image gradients (finite
  differences) is a cheap stand-in for them here. The latent scale ``1 / std(z)`` (LDM Sec. 4.3.2, App. D.1) is measured on
  training images after training and kept in the stored metrics; :func:`load_vae` sets it.
* ``shapes-ldm-f{f}`` (f = 1, 2, 4, 8): an unconditional eps-prediction UNet trained in the
  (scaled) latent space of ``shapes-vae-f{f}``; f = 1 is pixel diffusion with no autoencoder. Every
  f gets the same network, batch size, optimiser and the same *compute* budget: the steps are the
  budget divided by the model's compute seconds per step measured on the machine (CPU time on a
  CPU, :func:`sweep_steps`), so a model in a smaller space takes more steps. The steps taken are
  kept in the stored metrics.
* ``shapes-ldm-t2i``: text-to-image in the f = 4 latent space on one-object scenes ("a large red
  circle at the top left", and paraphrases): a small caption transformer (CLIP's text tower,
  trained from scratch jointly with the UNet) feeds the cross-attention of a ``UNet2DCondition``;
  captions are dropped 10% of the time so that classifier-free guidance (chapter 06) can be used
  at sampling time (``shapes-ldm-t2i-p0.2`` and ``-p0.5``: the same recipe dropping 20% and 50%,
  for chapter 06's comparison). One object keeps the task learnable in a CPU budget; the autoencoder is the
  one trained on 1-3 objects.

The training data is one fixed set of rendered scenes per profile (:func:`training_set`),
encoded once by the autoencoder (the posterior's mean and std are kept; every step draws a fresh
``z = mu + sigma eps``), so a diffusion step never pays for the encoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from ..data.shapes import ShapesWorld
from ..models.clip import CLIPTextConfig
from ..models.text_to_image import TextToImageUNet, coordinate_maps  # noqa: F401 (re-exported)
from ..models.tokenizers import WordTokenizer
from ..models.unet import UNet2D
from ..models.unet_cond import CondUNetConfig
from ..models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, compute_latent_scale
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile
from ..samplers.guidance import drop_condition
from ..store import Recipe, Stored, load, register
from ..train import TrainConfig, train
from .digits import unet_config

FACTORS = (1, 2, 4, 8)           # the downsampling factors of the sweep (1: pixel space)
VAE_FACTORS = (2, 4, 8)
T2I_FACTOR = 4                    # the latent space of the text-to-image model
T2I_MAX_OBJECTS = 1               # its scenes: one object, named by shape, colour, size and position
LATENT_CHANNELS = 4
VAE_WIDTHS = (8, 16, 32, 32)      # per level (CPU profiles); the first log2(f) + 1 are used
DEFAULT_BETA_KL = 1e-5


# ------------------------------------------------------------------------------------------------
# The data
# ------------------------------------------------------------------------------------------------

def resolution_for(p: Profile) -> int:
    return p.pick(smoke=32, cpu=32, gpu=64)


def world_for(p: Profile, text: bool = False, max_objects: int = 3) -> ShapesWorld:
    """The shapes world at the profile's resolution (seed 0 for every profile, so images agree)."""
    n_par = 4 if text else 0
    return ShapesWorld(resolution=resolution_for(p), seed=0, max_objects=max_objects, n_paraphrases=n_par,
                       n_heldout_paraphrases=0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 (0..255), a quarter of the memory."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (0..255) -> float images in [-1, 1]."""
    return x.float() / 127.5 - 1.0


@dataclass
class TrainingSet:
    """The fixed training scenes of a profile: ``pixels`` (N, 3, R, R) uint8, and per scene its
    ``captions`` and training ``paraphrases``. ``images(index)`` gives them in [-1, 1]."""

    pixels: torch.Tensor
    captions: list[str]
    paraphrases: list[list[str]]
    maps: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # spatial maps as uint8

    def condition(self, kind: str, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """A spatial map of the scenes (chapters 07-08's conditions) in its world range: ``edges``
        (N, 1, R, R) in {0, 1}, ``depth`` (N, 1, R, R) in [0, 1], ``palette`` (N, 3, R, R) in [-1, 1]."""
        if kind not in self.maps:
            raise ValueError(f"condition kind {kind!r}; the training set keeps {sorted(self.maps)}")
        m = self.maps[kind] if index is None else self.maps[kind][index]
        return from_uint8(m) if kind == "palette" else m.float() / 255

    def __len__(self) -> int:
        return len(self.pixels)

    def images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        return from_uint8(self.pixels if index is None else self.pixels[index])


MAP_KINDS = ("edges", "depth", "palette")   # the spatial maps kept beside the images (chapters 07-08)


@lru_cache(maxsize=2)
def _training_set(resolution: int, n: int, max_objects: int = 3, chunk: int = 1000) -> TrainingSet:
    world = ShapesWorld(resolution=resolution, seed=0, max_objects=max_objects, n_paraphrases=4,
                        n_heldout_paraphrases=0)
    pixels, captions, paraphrases, maps = [], [], [], {k: [] for k in MAP_KINDS}
    for k, start in enumerate(range(0, n, chunk)):
        scenes = world.sample(min(chunk, n - start), seed=1000 + k)
        pixels.append(to_uint8(scenes.images))
        captions += scenes.captions
        paraphrases += scenes.paraphrases
        for kind in MAP_KINDS:
            m = getattr(scenes, kind)
            maps[kind].append(to_uint8(m) if kind == "palette" else (m * 255).round().to(torch.uint8))
    return TrainingSet(torch.cat(pixels), captions, paraphrases, {k: torch.cat(v) for k, v in maps.items()})


def training_set(p: Profile, max_objects: int = 3) -> TrainingSet:
    """The fixed training set of the recipes here (rendered once per process, kept as uint8):
    scenes of 1 to ``max_objects`` objects (3 for the autoencoders and the sweep, 1 for
    text-to-image)."""
    return _training_set(resolution_for(p), p.pick(smoke=512, cpu=8000, gpu=16000), max_objects)


def heldout_images(p: Profile, n: int | None = None) -> torch.Tensor:
    """Held-out scenes (the world's fixed evaluation stream): (n, 3, R, R) in [-1, 1]."""
    n = n or p.pick(smoke=128, cpu=1000, gpu=2000)
    return world_for(p).fixed(n, seed=0).images


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, z0: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """Latents of the (scaled) latent space -> images in [-1, 1]: ``D(z0 / scale)``, in float32."""
    dev = next(vae.parameters()).device
    return torch.cat([vae.eval().decode(z0[i:i + batch].to(dev).float() / vae.scaling_factor).clamp(-1, 1).cpu()
                      for i in range(0, len(z0), batch)])


def _image_batches(data: TrainingSet, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    while True:
        yield data.images(torch.randint(0, len(data), (batch_size,), generator=g))


# ------------------------------------------------------------------------------------------------
# The autoencoder
# ------------------------------------------------------------------------------------------------

def vae_config(f: int, resolution: int, latent_channels: int = LATENT_CHANNELS,
               widths: tuple[int, ...] = VAE_WIDTHS) -> VAEConfig:
    """The book's small KL autoencoder with downsampling factor ``f``: one residual block per level
    (two in the decoder), widths ``widths[:log2(f) + 1]``, self-attention at the lowest resolution."""
    n = {1: 1, 2: 2, 4: 3, 8: 4}[f]
    return VAEConfig(block_out_channels=widths[:n], layers_per_block=1, latent_channels=latent_channels,
                     norm_num_groups=8, sample_size=resolution, scaling_factor=1.0)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite differences along W and H: ``(B, C, H, W-1)`` and ``(B, C, H-1, W)``."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, beta_kl: float, edge_weight: float = 1.0,
             generator: torch.Generator | None = None, rec: str = "l2") -> dict[str, torch.Tensor]:
    """The autoencoder's loss terms, each a per-pixel-value mean over the batch (scalars):

        rec  = mean err(x - D(z))                 z = mu + sigma eps ~ q(z | x)
        edge = mean err(grad x - grad D(z))       (a cheap stand-in for LDM's perceptual loss)
        kl   = KL(q(z | x) || N(0, I)) / (C H W)  (nats per pixel value)
        loss = rec + edge_weight * edge + beta_kl * kl

    with err(d) = d^2 for ``rec="l2"`` (the default, and what every recipe trains with), |d| for
    ``"l1"`` (LDM's choice, with LPIPS beside it) and |d| + d^2 for ``"l1+l2"``.
    """
    posterior: DiagonalGaussian = vae.encode(x)
    z = posterior.sample(generator)
    x_hat = vae.decode(z)
    err = {"l1": lambda d: d.abs().mean(), "l2": lambda d: d.pow(2).mean(),
           "l1+l2": lambda d: d.abs().mean() + d.pow(2).mean()}[rec]
    (gx, gy), (hx, hy) = image_gradients(x), image_gradients(x_hat)
    edge = 0.5 * (err(gx - hx) + err(gy - hy))
    rec = err(x - x_hat)
    kl = posterior.kl().mean() / x[0].numel()
    return {"loss": rec + edge_weight * edge + beta_kl * kl, "rec": rec, "edge": edge, "kl": kl}


def _vae_config(f: int, beta_kl: float = DEFAULT_BETA_KL):
    def config(p: Profile) -> dict[str, Any]:
        return {"f": f, "resolution": resolution_for(p), "latent_channels": LATENT_CHANNELS,
                "widths": list(p.pick(smoke=VAE_WIDTHS, cpu=VAE_WIDTHS, gpu=(32, 64, 128, 128))),
                "beta_kl": beta_kl, "rec": "l2", "edge_weight": 1.0, "init_logvar": -6.0,
                "steps": p.pick(smoke=40, cpu=1500, gpu=2500), "batch_size": p.pick(smoke=8, cpu=16, gpu=32),
                "lr": p.pick(smoke=5e-3, cpu=5e-3, gpu=2e-3), "seed": 0}
    return config


def build_vae(c: dict[str, Any]) -> AutoencoderKL:
    """A fresh autoencoder whose posterior starts narrow: the log-variance half of ``quant_conv``'s
    bias is ``c["init_logvar"]`` (sigma = exp(init_logvar / 2)). With the default bias of 0, every
    latent starts as mostly noise (sigma = 1 against small means) and the decoder learns nothing
    until the encoder's means grow; a narrow start makes it an ordinary autoencoder from step one,
    and the KL term is then free to widen sigma again."""
    torch.manual_seed(c["seed"])
    vae = AutoencoderKL(vae_config(c["f"], c["resolution"], c["latent_channels"], tuple(c["widths"])))
    with torch.no_grad():
        vae.quant_conv.bias[c["latent_channels"]:].fill_(c.get("init_logvar", 0.0))
    return vae


@torch.no_grad()
def vae_statistics(vae: AutoencoderKL, images: torch.Tensor, batch: int = 250, seed: int = 0) -> dict[str, float]:
    """What the autoencoder does to ``images`` (N, 3, H, W): reconstruction error (L1 and PSNR, of
    the posterior mean), KL per latent dimension, the spread of the latents ``z ~ q(z | x)`` (std
    over everything), of their means across images, and the mean posterior std ``sigma``."""
    vae.eval()
    dev = next(vae.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    l1, mse, kl, zs, mus, sig = 0.0, 0.0, 0.0, [], [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(dev)
        q = vae.encode(x)
        x_hat = vae.decode(q.mode()).clamp(-1, 1)
        l1 += (x - x_hat).abs().mean((1, 2, 3)).sum().item()
        mse += ((x - x_hat) / 2).pow(2).mean((1, 2, 3)).sum().item()   # in [0, 1] units, for PSNR
        kl += (q.kl() / q.mean[0].numel()).sum().item()
        zs.append(q.sample(g).cpu())
        mus.append(q.mean.cpu())
        sig.append(q.std.mean((1, 2, 3)).cpu())
    n = len(images)
    z = torch.cat(zs)
    return {"rec_l1": l1 / n, "psnr": 10 * math.log10(1.0 / max(mse / n, 1e-12)), "kl_per_dim": kl / n,
            "z_std": z.std().item(), "z_mean": z.mean().item(), "mu_std": torch.cat(mus).std().item(),
            "sigma_mean": torch.cat(sig).mean().item()}


def train_vae(vae: AutoencoderKL, c: dict[str, Any], p: Profile, progress: bool = True,
              data: TrainingSet | None = None, heldout: torch.Tensor | None = None) -> dict[str, Any]:
    """Train ``vae`` by the recipe ``c`` on ``data`` (default: the shapes :func:`training_set`) and
    report its statistics on ``heldout`` images (default: 500 held-out scenes)."""
    data = training_set(p) if data is None else data
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, x):
        return vae_loss(m, x, c["beta_kl"], c["edge_weight"], g, c["rec"])["loss"]

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=0.0, warmup_steps=min(100, c["steps"] // 5),
                      final_lr_fraction=0.05, desc=f"KL autoencoder f={c['f']}")
    res = train(vae, loss_fn, _image_batches(data, c["batch_size"], c["seed"]), cfg, p, progress=progress)
    vae.eval()
    scale_images = data.images(slice(0, p.pick(smoke=256, cpu=1000, gpu=2000))).to(p.device)
    scale = compute_latent_scale(vae, scale_images, torch.Generator(device=p.device).manual_seed(1))
    tail = res.losses[-50:]
    out = {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
           "latent_scale": scale}
    heldout = heldout_images(p, 500) if heldout is None else heldout
    out.update({k: round(v, 5) for k, v in vae_statistics(vae, heldout).items()})
    return out


def _train_vae(vae: AutoencoderKL, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    return train_vae(vae, c, p)


def load_vae(f: int, profile: Profile | None = None, verbose: bool = True) -> Stored:
    """The stored autoencoder ``shapes-vae-f{f}`` with its ``scaling_factor`` set to the latent
    scale measured on data after training (in ``stored.metrics["latent_scale"]``)."""
    stored = load(f"shapes-vae-f{f}", profile, verbose=verbose)
    stored.model.scaling_factor = float(stored.metrics["latent_scale"])
    return stored


VAE_RECIPES = {
    f: register(Recipe(f"shapes-vae-f{f}", 1, _vae_config(f), build_vae, _train_vae,
                       f"KL autoencoder on shapes, downsampling factor {f}, {LATENT_CHANNELS} latent channels"))
    for f in VAE_FACTORS
}
SHAPES_VAE_F2, SHAPES_VAE_F4, SHAPES_VAE_F8 = (VAE_RECIPES[f] for f in VAE_FACTORS)

# the f = 4 autoencoder again with a large KL weight (chapter 04, section 4); the default weight's
# model is shapes-vae-f4 itself
STRONG_BETA_KL = 0.1
KL_WEIGHTS = (DEFAULT_BETA_KL, STRONG_BETA_KL)
SHAPES_VAE_F4_KL01 = register(Recipe("shapes-vae-f4-kl0.1", 1, _vae_config(4, STRONG_BETA_KL), build_vae, _train_vae,
                                     "shapes-vae-f4 trained with KL weight 0.1 instead of 1e-5"))


def kl_recipe_name(beta_kl: float) -> str:
    return "shapes-vae-f4" if beta_kl == DEFAULT_BETA_KL else f"shapes-vae-f4-kl{beta_kl:g}"


# ------------------------------------------------------------------------------------------------
# Diffusion in the latent space (f = 1: pixels)
# ------------------------------------------------------------------------------------------------

def latent_diffusion(schedule: str = "linear") -> GaussianDiffusion:
    """The process of the models here: T = 1000, eps-prediction, DDPM's ``"linear"`` schedule
    (beta 1e-4 to 0.02) or LDM's own ``"scaled_linear"`` (beta from 0.00085 to 0.012, linear in
    sqrt(beta): Stable Diffusion's), which destroys information more slowly."""
    return GaussianDiffusion.from_schedule(schedule, 1000, prediction="eps", variance="fixed_small")


def diffusion_for(c: dict[str, Any]) -> GaussianDiffusion:
    """The process of a stored model's config (its ``"schedule"``; ``"linear"`` if it has none)."""
    return latent_diffusion(c.get("schedule", "linear"))


def latent_shape(f: int, resolution: int) -> tuple[int, int, int]:
    """(C, H, W) of the space a model with downsampling factor ``f`` diffuses in."""
    return (3 if f == 1 else LATENT_CHANNELS, resolution // f, resolution // f)


def sweep_unet_config(f: int, resolution: int, width: int) -> Any:
    """The same UNet for every f (widths (w, 2w, 2w), attention at the lowest level: chapter 01's),
    only its input size and channels follow the space it works in."""
    c, h, _ = latent_shape(f, resolution)
    return dataclasses.replace(unet_config(width, h, c, dropout=0.0), in_channels=c)


class LatentCodes:
    """A fixed image set encoded once: the posterior's mean and std, ``(N, c, h, w)`` each, and the
    latent scale. :meth:`sample` draws ``scale * (mu + sigma eps)`` for a batch of indices (the
    diffusion model's x_0); with no autoencoder (f = 1) it returns the images themselves.
    ``images``: (N, 3, R, R) in [-1, 1], or uint8 (0..255, converted batch by batch)."""

    def __init__(self, images: torch.Tensor, vae: AutoencoderKL | None, batch: int = 250):
        self.vae = vae
        self.scale = 1.0 if vae is None else float(vae.scaling_factor)
        self.std: torch.Tensor | None = None
        start = time.perf_counter()
        if vae is None:
            self.mean = images
        else:
            dev = next(vae.parameters()).device
            mus, stds = [], []
            with torch.no_grad():
                for i in range(0, len(images), batch):
                    q = vae.eval().encode(_as_float(images[i:i + batch]).to(dev))
                    mus.append(q.mean.cpu())
                    stds.append(q.std.cpu())
            self.mean, self.std = torch.cat(mus), torch.cat(stds)
        self.seconds = time.perf_counter() - start

    def __len__(self) -> int:
        return len(self.mean)

    def sample(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mu = self.mean[index]
        if self.std is None:
            return _as_float(mu)
        eps = torch.randn(mu.shape, generator=generator)
        return self.scale * (mu + self.std[index] * eps)

    def batches(self, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            yield self.sample(torch.randint(0, len(self), (batch_size,), generator=g), g)


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return from_uint8(x) if x.dtype == torch.uint8 else x


def _vae_for(f: int, p: Profile) -> AutoencoderKL | None:
    return None if f == 1 else load_vae(f, p).model


def _ldm_config(f: int):
    def config(p: Profile) -> dict[str, Any]:
        c = {"f": f, "resolution": resolution_for(p), "width": p.pick(smoke=16, cpu=32, gpu=64),
             "budget_seconds": p.pick(smoke=4, cpu=100, gpu=60),
             "min_steps": p.pick(smoke=10, cpu=100, gpu=1000), "max_steps": p.pick(smoke=200, cpu=6000, gpu=60000),
             "batch_size": p.pick(smoke=16, cpu=32, gpu=128),
             "lr": 1e-3, "ema_decay": p.pick(smoke=0.99, cpu=0.999, gpu=0.9995), "seed": 0}
        if f > 1:  # the autoencoder is part of the model: retrain when its recipe changes
            r = VAE_RECIPES[f]
            c["vae"] = {"recipe": r.name, "version": r.version, **r.config(p)}
        return c
    return config


def build_ldm(c: dict[str, Any]) -> UNet2D:
    torch.manual_seed(c["seed"])
    return UNet2D(sweep_unet_config(c["f"], c["resolution"], c["width"]))


def compute_clock(device: torch.device) -> Any:
    """The clock a compute budget is measured with: CPU time of this process on a CPU (all its
    threads; unlike wall time it barely changes when other programs share the machine), wall
    time on a GPU (the caller synchronises)."""
    return time.process_time if device.type == "cpu" else time.perf_counter


@contextlib.contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """On a CPU, run the block on one thread: a measurement of compute then counts work, not the
    spin-waiting of threads on a machine that other programs share."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def step_seconds(configs: dict[int, dict[str, Any]], p: Profile, repeats: int = 5, warmup: int = 2) -> dict[int, float]:
    """Compute seconds (:func:`compute_clock`; one thread on a CPU) of one training step (forward,
    backward, clipping, AdamW, EMA) of each sweep model, on random inputs of its space; the models
    take turns and each number is a median."""
    import copy
    import statistics

    diffusion = latent_diffusion()
    dev = p.device
    state = {}
    for f, c in configs.items():
        m = build_ldm(c).to(dev).train()
        if dev.type == "cpu":
            m = m.to(memory_format=torch.channels_last)
        x0 = torch.randn(c["batch_size"], *latent_shape(f, c["resolution"]), device=dev)
        state[f] = (m, copy.deepcopy(m), torch.optim.AdamW(m.parameters(), lr=1e-4), x0)
    clock = compute_clock(dev)
    times: dict[int, list[float]] = {f: [] for f in configs}
    with one_cpu_thread(dev):
        _time_steps(state, diffusion, clock, times, dev, warmup, repeats)
    return {f: statistics.median(t) for f, t in times.items()}


def _time_steps(state: dict, diffusion: GaussianDiffusion, clock: Any, times: dict, dev: torch.device,
                warmup: int, repeats: int) -> None:
    for i in range(warmup + repeats):
        for f, (m, ema, opt, x0) in state.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            loss = diffusion.training_losses(m, x0)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(m.parameters()), 0.001)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[f].append(clock() - start)


_STEP_SECONDS: dict[tuple, dict[int, float]] = {}


def sweep_steps(c: dict[str, Any], p: Profile) -> tuple[int, float]:
    """How many steps model ``c`` gets for its compute budget on this machine, and its compute
    seconds per step.
    The step times of all four sweep models are measured together once per process."""
    key = (p.name, str(p.device))
    if key not in _STEP_SECONDS:
        _STEP_SECONDS[key] = step_seconds({f: LDM_RECIPES[f].config(p) for f in FACTORS}, p)
    sec = _STEP_SECONDS[key][c["f"]]
    steps = int(min(max(c["budget_seconds"] / sec, c["min_steps"]), c["max_steps"]))
    return steps, sec


def _train_ldm(model: UNet2D, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    """An equal compute budget: the steps are ``budget_seconds`` divided by this model's measured
    compute seconds per step (so a model in a small latent space takes more steps)."""
    codes = LatentCodes(training_set(p).pixels, _vae_for(c["f"], p))
    steps, sec = (c["steps"], None) if "steps" in c else sweep_steps(c, p)   # equal steps, or equal compute
    diffusion = diffusion_for(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, x0):
        return diffusion.training_losses(m, x0, generator=g)["loss"].mean()

    cfg = TrainConfig(steps=steps, lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, steps // 5),
                      desc=f"diffusion, f={c['f']} ({steps} steps)")
    clock = compute_clock(p.device)
    start = clock()
    res = train(model, loss_fn, codes.batches(c["batch_size"], c["seed"]), cfg, p)
    compute = clock() - start
    model.load_state_dict(res.ema.state_dict())  # the store keeps the EMA weights
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "train_compute_seconds": round(compute, 1), "encode_seconds": round(codes.seconds, 1),
            "steps": steps, "step_compute_seconds": None if sec is None else round(sec, 5),
            "batch_size": c["batch_size"],
            "latent_scale": codes.scale}


LDM_RECIPES = {
    f: register(Recipe(f"shapes-ldm-f{f}", 1, _ldm_config(f), build_ldm, _train_ldm,
                       "pixel diffusion on shapes" if f == 1 else
                       f"unconditional diffusion in the f={f} latent space of shapes-vae-f{f}", process=diffusion_for))
    for f in FACTORS
}
SHAPES_LDM_F1, SHAPES_LDM_F2, SHAPES_LDM_F4, SHAPES_LDM_F8 = (LDM_RECIPES[f] for f in FACTORS)


def equal_steps(p: Profile) -> int:
    """The training steps every model of the equal-steps sweep takes (the paper's Fig. 6 compares its
    LDM-f at equal steps). At ``cpu`` this is about 2.4x what f = 1 gets in the equal-compute sweep
    and a third of what f = 4 gets there: the f = 1 model alone costs about 4 minutes of one thread."""
    return p.pick(smoke=10, cpu=400, gpu=5000)


def _ldm_steps_config(f: int):
    def config(p: Profile) -> dict[str, Any]:
        c = {k: v for k, v in _ldm_config(f)(p).items() if k not in ("budget_seconds", "min_steps", "max_steps")}
        return {**c, "steps": equal_steps(p)}
    return config


#: the same models at an equal number of training steps (not an equal compute budget)
LDM_STEPS_RECIPES = {
    f: register(Recipe(f"shapes-ldm-f{f}-steps", 1, _ldm_steps_config(f), build_ldm, _train_ldm,
                       f"shapes-ldm-f{f} trained for a fixed number of steps (equal steps across f) instead of "
                       "an equal compute budget", process=diffusion_for))
    for f in FACTORS
}
SHAPES_LDM_F1_STEPS, SHAPES_LDM_F2_STEPS, SHAPES_LDM_F4_STEPS, SHAPES_LDM_F8_STEPS = (
    LDM_STEPS_RECIPES[f] for f in FACTORS)


# ------------------------------------------------------------------------------------------------
# Text-to-image: cross-attention to a caption encoder, in the f = 4 latent space
# ------------------------------------------------------------------------------------------------

NULL_CAPTION = ""   # the unconditional "caption": <start> <end> <pad> ... (chapter 06 guides with it)


def tokenizer_for(c: dict[str, Any]) -> WordTokenizer:
    """The word tokenizer of a text-to-image config: the shapes world's training vocabulary."""
    return WordTokenizer(ShapesWorld.vocabulary(heldout=False), c["context_length"])


T2I_P_UNCONDS = (0.1, 0.2, 0.5)   # caption dropout rates (chapter 06 compares them; chapter 04 uses 0.1)


def t2i_p_unconds(p: Profile) -> tuple[float, ...]:
    """The caption dropout rates chapter 06 trains the text-to-image recipe at: all three, but at ``cpu``
    0.1 and 0.2 only (each model is about five minutes of a 2-core laptop; 0.2 is GLIDE's choice and the
    one the paper finds as good as 0.1, while the digits of chapter 06 cover 0.5)."""
    return p.pick(smoke=T2I_P_UNCONDS, cpu=T2I_P_UNCONDS[:2], gpu=T2I_P_UNCONDS)


def t2i_recipe_name(p_uncond: float = 0.1) -> str:
    """``shapes-ldm-t2i`` (captions dropped 10% of the time) or ``shapes-ldm-t2i-p{p_uncond}``."""
    return "shapes-ldm-t2i" if p_uncond == T2I_P_UNCONDS[0] else f"shapes-ldm-t2i-p{p_uncond:g}"


def _t2i_config(p: Profile, p_uncond: float = T2I_P_UNCONDS[0]) -> dict[str, Any]:
    f, r = T2I_FACTOR, VAE_RECIPES[T2I_FACTOR]
    res = resolution_for(p)
    return {
        "f": f, "resolution": res, "width": p.pick(smoke=16, cpu=32, gpu=64),
        "text_width": p.pick(smoke=32, cpu=64, gpu=128), "text_layers": p.pick(smoke=1, cpu=2, gpu=4),
        "max_objects": T2I_MAX_OBJECTS,
        "context_length": world_for(p, text=True, max_objects=T2I_MAX_OBJECTS).max_caption_words() + 2,
        # cross-attention per level, highest resolution first (the middle block always has it)
        # (attention at the 8x8 level too: without it position stayed at chance, 0.10 against 0.99 at s = 3)
        "cross_attention": [True, True, False], "coord_channels": True, "schedule": "scaled_linear",
        "p_uncond": p_uncond, "paraphrases": True,
        "steps": p.pick(smoke=60, cpu=5000, gpu=10000), "batch_size": p.pick(smoke=16, cpu=32, gpu=64),
        "lr": 1e-3, "ema_decay": p.pick(smoke=0.99, cpu=0.999, gpu=0.9995), "seed": 0,
        "vae": {"recipe": r.name, "version": r.version, **r.config(p)},
    }


T2I_HEADS = 4


def t2i_unet_config(c: dict[str, Any]) -> CondUNetConfig:
    """The UNet of a text-to-image config (a ControlNet or adapter for the model is shaped by it)."""
    w = c["width"]
    xattn = c.get("cross_attention", [True, True, False])
    coords = c.get("coord_channels", False)
    return CondUNetConfig(
        sample_size=c["resolution"] // c["f"], in_channels=LATENT_CHANNELS + (2 if coords else 0),
        out_channels=LATENT_CHANNELS, block_out_channels=(w, 2 * w, 2 * w),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in xattn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(xattn)),
        layers_per_block=1, cross_attention_dim=c["text_width"], num_attention_heads=T2I_HEADS, norm_num_groups=8,
    )


def build_t2i(c: dict[str, Any], tok: WordTokenizer | None = None) -> TextToImageUNet:
    """The text-to-image model of config ``c``: a caption transformer over ``tok``'s vocabulary
    (default: the shapes world's, :func:`tokenizer_for`) and the UNet of :func:`t2i_unet_config`."""
    torch.manual_seed(c["seed"])
    tok = tokenizer_for(c) if tok is None else tok
    text = CLIPTextConfig.tiny(vocab_size=tok.vocab_size, max_position_embeddings=c["context_length"],
                               hidden_size=c["text_width"], intermediate_size=2 * c["text_width"],
                               num_hidden_layers=c["text_layers"], num_attention_heads=T2I_HEADS,
                               eos_token_id=tok.end_id, projection_dim=None)
    return TextToImageUNet(text, t2i_unet_config(c), coord_channels=c.get("coord_channels", False))


def caption_ids(scenes: Any, tokenizer: WordTokenizer, paraphrases: bool = True) -> torch.Tensor:
    """(N, V, L) token ids: per scene its caption and (``paraphrases``) its training paraphrases
    (``scenes``: anything with ``captions`` and ``paraphrases``, e.g. a :class:`TrainingSet`)."""
    texts = [[cap, *(par if paraphrases else [])] for cap, par in zip(scenes.captions, scenes.paraphrases)]
    V = min(len(t) for t in texts)
    return tokenizer.encode([t for row in texts for t in row[:V]]).view(len(texts), V, -1)


def t2i_loss(model: nn.Module, diffusion: GaussianDiffusion, z0: torch.Tensor, ids: torch.Tensor,
             null_ids: torch.Tensor, p_uncond: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 1 of Ho & Salimans with captions: each caption's tokens ``ids`` (B, L) become the
    null caption's ``null_ids`` (L,) with probability ``p_uncond``; then L_simple on the latents
    ``z0`` with the (possibly dropped) caption as the condition. The text encoder inside ``model``
    is trained by the same loss."""
    ids = drop_condition(ids, null_ids.to(ids.device), p_uncond, generator)
    return diffusion.training_losses(model, z0, generator=generator, model_kwargs={"input_ids": ids})["loss"].mean()


def caption_batches(codes: LatentCodes, ids: torch.Tensor, batch_size: int, seed: int,
                    extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless random batches ``(z0, caption ids[, extra(index)])``: scenes drawn with replacement, one
    of each scene's captions/paraphrases (``ids`` is (N, V, L)) at random, a fresh latent draw from the
    stored posterior. ``extra`` adds whatever else belongs to the same scenes (chapter 07's maps)."""
    gb = torch.Generator().manual_seed(seed)
    while True:
        i = torch.randint(0, len(codes), (batch_size,), generator=gb)
        v = torch.randint(0, ids.shape[1], (batch_size,), generator=gb)
        batch = (codes.sample(i, gb), ids[i, v])
        yield batch if extra is None else (*batch, extra(i))


def _train_t2i(model: TextToImageUNet, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    return train_t2i(model, c, p, training_set(p, c["max_objects"]), _vae_for(c["f"], p), tokenizer_for(c))


def train_t2i(model: TextToImageUNet, c: dict[str, Any], p: Profile, data: TrainingSet, vae: AutoencoderKL,
              tok: WordTokenizer) -> dict[str, Any]:
    """Train a text-to-image model by the recipe ``c`` on the captioned images ``data`` in ``vae``'s
    latent space (Algorithm 1 of Ho & Salimans: :func:`t2i_loss`); the store keeps the EMA weights."""
    codes = LatentCodes(data.pixels, vae)
    ids = caption_ids(data, tok, c["paraphrases"])
    null_ids = tok.encode([NULL_CAPTION])[0]
    diffusion = diffusion_for(c)
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        return t2i_loss(m, diffusion, batch[0], batch[1], null_ids, c["p_uncond"], g)

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=c["ema_decay"], warmup_steps=min(100, c["steps"] // 5),
                      desc="text-to-image latent diffusion")
    res = train(model, loss_fn, caption_batches(codes, ids, c["batch_size"], c["seed"]), cfg, p)
    model.load_state_dict(res.ema.state_dict())
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "encode_seconds": round(codes.seconds, 1), "steps": c["steps"], "batch_size": c["batch_size"],
            "latent_scale": codes.scale}


def _t2i_recipe(p_uncond: float) -> Recipe:
    return register(Recipe(
        t2i_recipe_name(p_uncond), 3, lambda p: _t2i_config(p, p_uncond), build_t2i, _train_t2i,
        "text-to-image diffusion in the f=4 latent space of shapes-vae-f4 (one-object scenes, LDM's scaled-linear "
        "schedule, coordinate channels): a caption transformer trained jointly with a cross-attention UNet; "
        f"captions dropped to the empty caption with p={p_uncond:g}", process=diffusion_for, tokenizer=tokenizer_for))


T2I_RECIPES = {p: _t2i_recipe(p) for p in T2I_P_UNCONDS}
SHAPES_LDM_T2I, SHAPES_LDM_T2I_P02, SHAPES_LDM_T2I_P05 = (T2I_RECIPES[p] for p in T2I_P_UNCONDS)
