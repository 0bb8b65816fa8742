"""Chapter 04's claims in miniature: Latent Diffusion (Rombach et al. 2022).

1. :func:`f_sweep` (the paper's Figs. 6-7 and Tab. 8 in small): the same UNet, with the same batch
   size and the same compute (CPU seconds on a CPU), in pixel space (f = 1) and in the latent spaces
   of KL autoencoders with f = 2, 4, 8 (a model in a smaller space fits more steps into it). For
   each f: FD of decoded samples (the shapes evaluator), the autoencoder's own FD (its
   reconstructions: the best a model in that space can reach), the steps taken, training seconds
   and sampling seconds per image. The paper: f = 1 trains and samples slowest; f = 4-16 reach
   good quality fastest; too large an f caps quality at what the autoencoder keeps.
2. :func:`text_to_image`: cross-attention to a caption transformer (LDM Sec. 3.3) in the f = 4
   latent space; caption accuracy judged by the shapes evaluator, with and without guidance.
3. :func:`step_cost`: one sampling step (a UNet forward) in the f = 4 latent space against one in
   pixel space, at the same image size.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch

from ..evaluate.attributes import ShapesEvaluator, shapes_evaluator
from ..models.vae import AutoencoderKL
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile, current
from ..recipes import latent as R
from ..samplers.ddim import ddim_sample
from ..samplers.guidance import check_scale, float_output, guided_sample
from ..store import Stored, device_of, load
from . import generation

PAPER = {
    # Fig. 6 (class-conditional ImageNet, FID and IS over 2M training steps, same steps and parameters
    # for every f): a plot with no printed values; the paper's reading of it, Sec. 4.1:
    "fig6": "LDM-1 needs far longer training than LDM-4..16; LDM-32 is capped by its first stage",
    # Sec. 4.1, the one number the text gives for Fig. 6: FID of LDM-1 minus FID of LDM-8 after 2M steps
    "fig6_fid_gap_ldm1_ldm8": 38,
    # Fig. 7 (FID against samples per second, DDIM with 10-200 steps; CelebA-HQ and ImageNet): a plot
    "fig7": "LDM-4 and LDM-8 reach far lower FID than pixel-space LDM-1 at far higher throughput",
}

#: LDM Table 8 (appendix D.2), the KL-regularised autoencoders of its autoencoder zoo (trained on
#: OpenImages, evaluated on ImageNet-Val): f -> [(latent channels c, R-FID of the reconstructions,
#: PSNR in dB)], one entry per autoencoder. R-FID is the FID of the autoencoder's own reconstructions, the
#: paper's counterpart of the "FD autoenc." column of :func:`f_sweep`.
PAPER_TABLE8_KL: dict[int, list[tuple[int, float, float]]] = {
    2: [(2, 0.086, 32.47)],
    4: [(3, 0.27, 27.53)],
    8: [(4, 0.90, 24.19)],
    16: [(16, 0.87, 24.08), (8, 2.63, 21.94)],
    32: [(64, 2.04, 22.27), (16, 7.3, 20.38)],
}


def sampling_steps(profile: Profile) -> int:
    """DDIM steps (eta = 0) for every model of the chapter."""
    return profile.pick(smoke=5, cpu=25, gpu=100)


def fd_sample_count(profile: Profile) -> int:
    return profile.pick(smoke=64, cpu=500, gpu=2000)



@torch.no_grad()
def decode(vae: AutoencoderKL | None, x0: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """A diffusion sample -> an image in [-1, 1]: ``D(x0 / scale)`` (identity for pixel models)."""
    if vae is None:
        return x0.clamp(-1, 1)
    dev = device_of(vae)
    return torch.cat([vae.eval().decode(x0[i:i + batch].to(dev) / vae.scaling_factor).clamp(-1, 1).cpu()
                      for i in range(0, len(x0), batch)])


@torch.no_grad()
def generate(model: torch.nn.Module, vae: AutoencoderKL | None, f: int, resolution: int, n: int, steps: int,
             seed: int = 0, batch: int = 250, progress: bool = False,
             model_kwargs: dict[str, Any] | None = None, profile: Profile | None = None,
             process: GaussianDiffusion | None = None) -> torch.Tensor:
    """``n`` images (n, 3, R, R) in [-1, 1] from an unconditional model in the space of factor ``f``:
    DDIM (eta = 0) in that space, the network under the profile's mixed precision (bf16 where the
    machine has it), then the decoder (float32). Pixel samples are clipped at every step (x0_hat in
    [-1, 1]); latents are not, they have no fixed range."""
    profile = profile or current()
    process = process or R.latent_diffusion()
    model.eval()
    x_T = generation.gaussian(torch.Generator().manual_seed(seed), R.latent_shape(f, resolution), device_of(model))

    def sample(x: torch.Tensor, _: Any) -> torch.Tensor:
        return ddim_sample(model, process, x, steps, eta=0.0, clip_denoised=(f == 1), progress=progress,
                           model_kwargs=model_kwargs)

    return generation.generate(sample, x_T, batch=batch, n=n, profile=profile, decode=lambda x0: decode(vae, x0))


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 250) -> torch.Tensor:
    """``D(mean of q(z | x))``, clipped to [-1, 1]: (N, 3, R, R) on the CPU."""
    dev = device_of(vae)
    return torch.cat([vae.eval()(images[i:i + batch].to(dev)).clamp(-1, 1).cpu() for i in range(0, len(images), batch)])


def kl_weight_effect(profile: Profile, n_shown: int = 12) -> dict[str, Any]:
    """The f = 4 autoencoder at each KL weight of :data:`recipes.latent.KL_WEIGHTS`: its statistics on
    held-out scenes (reconstruction error, KL per latent dimension, spread of z, of mu, mean sigma)
    and reconstructions of ``n_shown`` of them."""
    held = R.heldout_images(profile)
    rows = {}
    for beta in R.KL_WEIGHTS:
        stored = load(R.kl_recipe_name(beta), profile)
        rows[beta] = {"stats": R.vae_statistics(stored.model, held),
                      "reconstructions": reconstruct(stored.model, held[:n_shown]),
                      "train_seconds": stored.metrics.get("train_seconds")}
    return {"rows": rows, "images": held[:n_shown]}


def evaluate_factor(f: int, profile: Profile, evaluator: ShapesEvaluator, seed: int = 0,
                    progress: bool = True, equal: str = "compute") -> dict[str, Any]:
    """One row of the sweep: FD of samples and of reconstructions, the timings, the model's size.
    ``equal="compute"``: the model of the equal-compute sweep (``shapes-ldm-f{f}``); ``"steps"``: the
    one trained for :func:`recipes.latent.equal_steps` steps (``shapes-ldm-f{f}-steps``)."""
    if equal not in ("compute", "steps"):
        raise ValueError(f"equal must be 'compute' or 'steps', got {equal!r}")
    stored = load(f"shapes-ldm-f{f}" + ("-steps" if equal == "steps" else ""), profile)
    vae = None if f == 1 else R.load_vae(f, profile).model
    n, steps, res = fd_sample_count(profile), sampling_steps(profile), stored.config["resolution"]
    start = time.perf_counter()
    samples = generate(stored.model, vae, f, res, n, steps, seed=seed, progress=progress, profile=profile,
                       process=stored.diffusion)
    sample_seconds = time.perf_counter() - start
    held = R.heldout_images(profile, n)
    recon = held if vae is None else reconstruct(vae, held)
    m = stored.metrics
    return {
        "fd": evaluator.fd(samples), "fd_autoencoder": evaluator.fd(recon),
        "rec_l1": (recon - held).abs().mean().item(),
        "train_seconds": m.get("train_seconds"), "train_compute_seconds": m.get("train_compute_seconds"),
        "encode_seconds": m.get("encode_seconds", 0.0),
        "train_steps": m.get("steps"), "batch_size": stored.config["batch_size"],
        "budget_seconds": stored.config.get("budget_seconds"),   # None at equal steps
        "sample_seconds": sample_seconds, "sample_seconds_per_image": sample_seconds / n,
        "sampling_steps": steps, "n_samples": n, "latent_shape": R.latent_shape(f, res),
        "unet_parameters": sum(p.numel() for p in stored.model.parameters()),
        "final_loss": m.get("final_loss"), "trained_now": stored.trained_now, "samples": samples[:64],
    }


def f_sweep(profile: Profile, seed: int = 0, progress: bool = True, equal: str = "compute") -> dict[str, Any]:
    """The sweep over f = 1, 2, 4, 8 with the same UNet and batch, at an equal training budget in
    compute seconds (``equal="compute"``) or in steps (``equal="steps"``, the paper's Fig. 6)."""
    evaluator = shapes_evaluator(profile)
    refs = evaluator.references(n=fd_sample_count(profile), seed=seed)
    rows = {f: evaluate_factor(f, profile, evaluator, seed, progress, equal) for f in R.FACTORS}
    return {"rows": rows, "references": refs, "evaluator_accuracy": evaluator.accuracy, "equal": equal}


# ------------------------------------------------------------------------------------------------
# Text-to-image
# ------------------------------------------------------------------------------------------------

def guidance_scales(profile: Profile) -> tuple[float, ...]:
    """1 = the conditional model as trained; > 1 guided (classifier-free guidance, chapter 06)."""
    return (1.0, 3.0)


@torch.no_grad()
def encode_captions(stored: Stored, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The text-to-image model's caption states ``tau_theta(y)``: (B, N, d) for ``captions`` and
    (1, N, d) for the null caption (``cfg_eps`` broadcasts it), computed once, not at every step."""
    model = stored.model.eval()
    tok = stored.tokenizer
    dev = device_of(model)
    return (model.encode_text(tok.encode(list(captions)).to(dev)),
            model.encode_text(tok.encode([R.NULL_CAPTION]).to(dev)))


@torch.no_grad()
def generate_from_captions(stored: Stored, vae: AutoencoderKL, captions: list[str], steps: int,
                           scale: float = 1.0, seed: int = 0, batch: int = 250,
                           progress: bool = False, profile: Profile | None = None) -> torch.Tensor:
    """Images (len(captions), 3, R, R) in [-1, 1] from the text-to-image model: DDIM (eta = 0) in
    the latent space with ``eps = eps_u + scale (eps_c - eps_u)`` (scale 1: no guidance), the
    network under the profile's mixed precision, decoded in float32."""
    profile = profile or current()
    scale = check_scale(scale)
    model = stored.model.eval()
    c = stored.config
    x_T = generation.gaussian(torch.Generator().manual_seed(seed), R.latent_shape(c["f"], c["resolution"]),
                              device_of(model))

    def sample(x: torch.Tensor, states: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ctx, null = states
        # the network may run in bf16; the guided combination is done in float32 (float_output)
        return guided_sample(float_output(lambda xx, tt, cc: model(xx, tt, context=cc)), stored.diffusion, x, ctx, null,
                             scale, steps, clip_denoised=False, progress=progress)

    # each batch's caption states in float32 (outside autocast), before its x_T
    return generation.generate(sample, x_T, batch=batch, n=len(captions), profile=profile,
                               condition=lambda i, j: encode_captions(stored, captions[i:j]),
                               decode=lambda z0: decode(vae, z0))


def _per_attribute(evaluator: ShapesEvaluator, images: torch.Tensor, scenes) -> dict[str, float]:
    acc = {"caption": evaluator.caption_accuracy(images, scenes)}
    for a in ("shape", "color", "size", "position"):
        acc[a] = evaluator.caption_accuracy(images, scenes, attributes=(a,))
    return acc


def text_to_image(profile: Profile, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Caption accuracy of the text-to-image model on unseen captions of its training distribution
    (one-object scenes: the object's shape, color, size and position right, nothing extra), per
    guidance scale; with the real images (the ceiling) and the samples judged against shuffled
    captions (what a model that ignored its caption would score). FD is measured against real
    one-object scenes (the captions' own images), with its floor: other real one-object scenes, the
    same number."""
    evaluator = shapes_evaluator(profile)
    stored = load("shapes-ldm-t2i", profile)
    vae = R.load_vae(stored.config["f"], profile).model
    n = profile.pick(smoke=32, cpu=300, gpu=1000)
    world = R.world_for(profile, text=True, max_objects=stored.config["max_objects"])
    scenes = world.fixed(n, seed=1, split="train")
    other = world.fixed(n, seed=2, split="train").images
    steps = sampling_steps(profile)
    rows = {}
    perm = torch.roll(torch.arange(n), 1)
    for s in guidance_scales(profile):
        start = time.perf_counter()
        images = generate_from_captions(stored, vae, scenes.captions, steps, s, seed=seed, progress=progress,
                                        profile=profile)
        seconds = time.perf_counter() - start
        rows[s] = {"accuracy": _per_attribute(evaluator, images, scenes),
                   "shuffled": _per_attribute(evaluator, images, scenes[perm]),
                   "fd": evaluator.fd(images, reference=scenes.images),
                   "sample_seconds_per_image": seconds / n, "samples": images[:32]}
    return {"rows": rows, "real": _per_attribute(evaluator, scenes.images, scenes),
            "fd_floor": evaluator.fd(other, reference=scenes.images), "captions": scenes.captions[:32],
            "n": n, "sampling_steps": steps, "train_seconds": stored.metrics.get("train_seconds"),
            "train_steps": stored.config["steps"], "trained_now": stored.trained_now,
            "parameters": {"text_encoder": sum(p.numel() for p in stored.model.text_encoder.parameters()),
                           "unet": sum(p.numel() for p in stored.model.unet.parameters())}}


# ------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def step_cost(profile: Profile, f: int = 4, batch: int = 32, repeats: int | None = None, warmup: int = 2,
              mixed_precision: bool = False) -> dict[str, float]:
    """Median compute seconds (CPU time on one thread on a CPU, wall time on a GPU) of one UNet
    forward (one sampling step) for the sweep's UNet in the latent space of factor ``f`` and in
    pixel space, same image size and batch, alternating the two; in float32, or under the profile's
    mixed precision (``mixed_precision=True``, as the samplers of this chapter run).
    Returns ``{"latent_s", "pixel_s", "ratio"}`` with ratio = latent / pixel."""
    repeats = repeats or profile.pick(smoke=3, cpu=10, gpu=20)
    dev = profile.device
    models, inputs = {}, {}
    for name, k in (("latent", f), ("pixel", 1)):
        c = R.LDM_RECIPES[k].config(profile)
        models[name] = R.build_ldm(c).to(dev).eval()
        inputs[name] = torch.randn(batch, *R.latent_shape(k, c["resolution"]), device=dev)
    t = torch.full((batch,), 500, device=dev)
    clock = R.compute_clock(dev)
    times: dict[str, list[float]] = {name: [] for name in models}
    amp = profile.autocast() if mixed_precision else contextlib.nullcontext()
    with R.one_cpu_thread(dev), amp:
        for i in range(warmup + repeats):
            for name, m in models.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                start = clock()
                m(inputs[name], t)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[name].append(clock() - start)
    lat, pix = statistics.median(times["latent"]), statistics.median(times["pixel"])
    return {"latent_s": lat, "pixel_s": pix, "ratio": lat / pix}
