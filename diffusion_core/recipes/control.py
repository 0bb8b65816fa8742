"""Chapters 07-08's stored models: ControlNets and T2I-Adapters on chapter 04's text-to-image model.

Both add spatial control to the *locked* ``shapes-ldm-t2i`` model (its UNet and caption encoder are
never updated) from one of the shapes world's maps of the same scene:

* ``edges`` (1 channel, {0, 1}): the outline of the object, like a Canny map;
* ``depth`` (1 channel, [0, 1]): the depth-like map (nearer is larger);
* ``palette`` (3 channels, [-1, 1]): the 8x8 grid of mean colours (T2I-Adapter's colour condition).

``shapes-controlnet-{kind}``: a :class:`~diffusion_core.models.controlnet.ControlNet` copied from
the base UNet's encoder (Zhang et al. 2023). ``shapes-t2i-adapter-{kind}``: a
:class:`~diffusion_core.models.t2i_adapter.T2IAdapter` trained from scratch (Mou et al. 2023).
Both are trained by one loop with the same budget (:func:`control_budget`: steps, batch, learning
rate, caption dropout), so chapter 08 compares them at equal training compute. As in the ControlNet
paper, the caption is replaced by the empty caption half of the time, so that the add-on learns to
read the condition itself rather than lean on the caption. The loss is L_simple on the latents of
the base model's training scenes (the same scenes, with their maps), with the base's eps-prediction
as the output.

While training, every ``eval_every`` steps the recipe samples a fixed batch of conditions and scores
adherence (edge F1 for edges, depth error for depth, palette error for palette), so the stored
metrics hold the curve over training steps: the ControlNet paper's "sudden convergence" figure.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import batch_randint, batch_randn
from ..evaluate import control as M
from ..models.controlnet import ControlNet, ControlNetConfig
from ..models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from ..models.text_to_image import TextToImageUNet
from ..models.vae import AutoencoderKL
from ..process.gaussian import GaussianDiffusion
from ..profiles import Profile, current
from ..samplers.ddim import ddim_sample
from ..samplers.guidance import cfg_eps, drop_condition
from ..store import Recipe, Stored, load, register
from ..train import TrainConfig, train
from . import latent as L

CONDITIONS = {"edges": 1, "depth": 1, "palette": 3}   # kind -> channels
BASE = "shapes-ldm-t2i"
CONTROLNET_KINDS = ("edges", "depth")
ADAPTER_KINDS = ("edges", "depth", "palette")
GUIDANCE = 3.0   # the base model's best caption accuracy in chapter 04 (0.74 at s=3)


def _check_kind(kind: str) -> str:
    if kind not in CONDITIONS:
        raise ValueError(f"condition kind must be one of {', '.join(CONDITIONS)}, got {kind!r}")
    return kind


def control_budget(p: Profile) -> dict[str, Any]:
    """The training budget shared by every ControlNet and T2I-Adapter (equal compute in chapter 08)."""
    return {"steps": p.pick(smoke=24, cpu=1200, gpu=4000), "batch_size": p.pick(smoke=8, cpu=32, gpu=64),
            "lr": 3e-4, "p_drop_caption": 0.5, "seed": 0,
            "eval_every": p.pick(smoke=12, cpu=100, gpu=250), "eval_n": p.pick(smoke=8, cpu=48, gpu=64),
            "eval_steps": p.pick(smoke=4, cpu=10, gpu=20)}


def _base_ref(p: Profile) -> dict[str, Any]:
    r = L.T2I_RECIPES[L.T2I_P_UNCONDS[0]]
    return {"recipe": r.name, "version": r.version, **r.config(p)}


def conditions(scenes: Any, kind: str) -> torch.Tensor:
    """The condition image of ``kind`` for rendered ``scenes`` (a :class:`~diffusion_core.data.shapes.Scenes`)."""
    return getattr(scenes, _check_kind(kind)).float()


# ------------------------------------------------------------------------------------------------
# the base model with an add-on: one eps function for training and sampling
# ------------------------------------------------------------------------------------------------
def unet_kwargs(base: TextToImageUNet, addon: nn.Module | Sequence[nn.Module] | None, x: torch.Tensor,
                t: torch.Tensor, context: torch.Tensor, cond: torch.Tensor | Sequence[torch.Tensor] | None,
                scale: float | Sequence[float] = 1.0, features: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """The keyword arguments that join ``addon`` to the base UNet at one step.

    A :class:`ControlNet` (or a list of them, one condition and scale each: their residuals add) runs
    on the UNet's own input at every step. A :class:`T2IAdapter` (or a list, features weighted by
    ``scale``) runs on the condition alone; pass its ``features`` to reuse them across steps."""
    if addon is None:
        return {}
    nets = list(addon) if isinstance(addon, (list, tuple)) else [addon]
    conds = list(cond) if isinstance(cond, (list, tuple)) else [cond]
    scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(nets)
    if not (len(nets) == len(conds) == len(scales)):
        raise ValueError(f"{len(nets)} add-ons need as many conditions and scales; got {len(conds)} and {len(scales)}")
    if all(isinstance(n, ControlNet) for n in nets):
        xin = base.unet_input(x)
        down, mid = None, None
        for net, c, s in zip(nets, conds, scales):
            d, m = net(xin, t, context, c, s)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
    if all(isinstance(n, T2IAdapter) for n in nets):
        if features is None:
            features = adapter_features(nets, conds, scales)
        rep = x.shape[0] // features[0].shape[0]
        return {"down_intrablock_additional_residuals": [f.repeat(rep, 1, 1, 1) for f in features]}
    raise ValueError("add-ons must all be ControlNets or all T2I-Adapters, got "
                     + ", ".join(type(n).__name__ for n in nets))


def adapter_features(adapters: Sequence[T2IAdapter], conds: Sequence[torch.Tensor],
                     weights: Sequence[float]) -> list[torch.Tensor]:
    """``F_c = sum_k w_k F_AD^k(C_k)`` (T2I-Adapter eq. 6): computed once, reused at every step."""
    total = None
    for a, c, w in zip(adapters, conds, weights):
        f = [w * x for x in a(c)]
        total = f if total is None else [u + v for u, v in zip(total, f)]
    return total


@torch.no_grad()
def sample(base: TextToImageUNet, diffusion: GaussianDiffusion, vae: AutoencoderKL, context: torch.Tensor,
           null_context: torch.Tensor, addon: nn.Module | Sequence[nn.Module] | None = None,
           cond: torch.Tensor | Sequence[torch.Tensor] | None = None, scale: float | Sequence[float] = 1.0,
           guidance: float = GUIDANCE, steps: int = 20, seed: int = 0, batch: int = 128,
           profile: Profile | None = None, progress: bool = False) -> torch.Tensor:
    """Images (B, 3, R, R) in [-1, 1]: DDIM (eta = 0) with classifier-free guidance on the caption
    states ``context`` (the control applied in both branches, as diffusers' pipelines do), decoded by
    the autoencoder. The noise is fixed by ``seed``: the same seed and captions give the same
    starting noise with and without control."""
    profile = profile or current()
    dev = next(base.parameters()).device
    n = context.shape[0]
    c = base.unet.config
    shape = (c.out_channels, c.sample_size, c.sample_size)
    g = torch.Generator().manual_seed(seed)
    x_T_all = torch.randn(n, *shape, generator=g)
    conds = None if cond is None else (list(cond) if isinstance(cond, (list, tuple)) else [cond])
    out = []
    for i in range(0, n, batch):
        sl = slice(i, i + batch)
        ctx = context[sl].to(dev)
        cs = None if conds is None else [k[sl].to(dev) for k in conds]
        adders = None
        if addon is not None:
            adders = addon if isinstance(addon, (list, tuple)) else [addon]
        feats = None
        if adders is not None and all(isinstance(a, T2IAdapter) for a in adders):
            scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(adders)
            with profile.autocast():
                feats = adapter_features(adders, cs, scales)

        def eps(x, t, cc, cs=cs, feats=feats, adders=adders):
            reps = None if cs is None else [k.repeat(x.shape[0] // k.shape[0], 1, 1, 1) for k in cs]
            kw = unet_kwargs(base, adders, x, t, cc, reps, scale, feats)
            return base(x, t, context=cc, **kw).float()

        def guided(x, t, ctx=ctx):
            return cfg_eps(eps, x, t, ctx, null_context.to(dev), guidance)

        with profile.autocast():
            z0 = ddim_sample(guided, diffusion, x_T_all[sl].to(dev), steps, eta=0.0, clip_denoised=False,
                             progress=progress).float()
        out.append(L.decode_latents(vae, z0.cpu()))
    return torch.cat(out)


def adherence(kind: str, images: torch.Tensor, cond: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image adherence of ``images`` to the condition of ``kind``: edge precision/recall/F1 (the
    sample's own edges, by the world's rule, within one pixel), depth error, or palette error."""
    if _check_kind(kind) == "edges":
        return M.edge_scores(M.edge_map(images), cond, tolerance=1)
    if kind == "depth":
        return {"depth_error": M.depth_error(images, cond)}
    return {"palette_error": M.palette_error(images, cond)}


_METRIC = {"edges": "f1", "depth": "depth_error", "palette": "palette_error"}


def _score(kind: str, images: torch.Tensor, cond: torch.Tensor) -> float:
    return float(adherence(kind, images, cond)[_METRIC[kind]].float().mean())


# ------------------------------------------------------------------------------------------------
# the recipes
# ------------------------------------------------------------------------------------------------
def _config(kind: str, addon: str):
    def config(p: Profile) -> dict[str, Any]:
        base = _base_ref(p)
        c = {"kind": kind, "addon": addon, "channels": CONDITIONS[kind], "base": base, **control_budget(p)}
        if addon == "controlnet":
            c["embedding_channels"] = [16, 32, 32]   # three stages: 4x down, to the f=4 latent grid
        else:
            w = base["width"]
            c["adapter_channels"] = [w, 2 * w, 2 * w]   # one feature per down block of the base UNet
            c["num_res_blocks"] = 2
        return c
    return config


def build_addon(c: dict[str, Any]) -> nn.Module:
    torch.manual_seed(c["seed"])
    unet_cfg = L.t2i_unet_config(c["base"])
    if c["addon"] == "controlnet":
        return ControlNet(ControlNetConfig(unet_cfg, c["channels"], tuple(c["embedding_channels"])))
    return T2IAdapter(T2IAdapterConfig(in_channels=c["channels"], channels=tuple(c["adapter_channels"]),
                                       num_res_blocks=c["num_res_blocks"], downscale_factor=c["base"]["f"]))


def load_base(p: Profile) -> tuple[Stored, AutoencoderKL, GaussianDiffusion]:
    """The locked text-to-image model (frozen), its autoencoder and its diffusion process."""
    stored = load(BASE, p)
    stored.model.eval().requires_grad_(False)
    vae = L.load_vae(stored.config["f"], p).model
    return stored, vae, L.diffusion_for(stored.config)


def _train_addon(addon: nn.Module, c: dict[str, Any], p: Profile) -> dict[str, Any]:
    stored, vae, diffusion = load_base(p)
    base = stored.model.to(p.device)
    if isinstance(addon, ControlNet):  # the trainable copy: the base encoder's weights
        fresh = ControlNet.from_unet(base.unet, c["channels"], tuple(c["embedding_channels"]))
        addon.load_state_dict(fresh.state_dict())
    data = L.training_set(p, c["base"]["max_objects"])
    tok = L.tokenizer_for(c["base"])
    codes = L.LatentCodes(data.pixels, vae)
    ids = L.caption_ids(data, tok, c["base"]["paraphrases"])
    null_ids = tok.encode([L.NULL_CAPTION])[0]
    kind = c["kind"]
    g = torch.Generator(device=p.device).manual_seed(c["seed"])
    torch.manual_seed(c["seed"])

    def loss_fn(m, batch):
        z0, batch_ids, cond = batch
        batch_ids = drop_condition(batch_ids, null_ids.to(batch_ids.device), c["p_drop_caption"], g)
        with torch.no_grad():
            ctx = base.encode_text(batch_ids)
        t = batch_randint(0, diffusion.T, (z0.shape[0],), device=z0.device, generator=g)
        noise = batch_randn(z0.shape, device=z0.device, generator=g)
        xt = diffusion.q_sample(z0, t, noise)
        eps = base(xt, t, context=ctx, **unet_kwargs(base, m, xt, t, ctx, cond))
        return (eps.float() - noise).square().mean()

    # the fixed evaluation batch: unseen scenes, their captions and conditions
    world = L.world_for(p, text=True, max_objects=c["base"]["max_objects"])
    ev = world.fixed(c["eval_n"], seed=7, split="train")
    ev_cond = conditions(ev, kind).to(p.device)
    with torch.no_grad():
        ev_ctx = base.encode_text(tok.encode(ev.captions).to(p.device))
        null_ctx = base.encode_text(tok.encode([L.NULL_CAPTION]).to(p.device))
    curve: list[list[float]] = []

    def callback(step, model, ema):
        if step % c["eval_every"] and step != c["steps"] - 1:
            return
        model.eval()
        images = sample(base, diffusion, vae, ev_ctx, null_ctx, model, ev_cond, steps=c["eval_steps"],
                        seed=c["seed"], profile=p)
        curve.append([step, round(_score(kind, images, ev_cond.cpu()), 4)])
        tqdm.write(f"[{c['addon']} {kind}] step {step}: {_METRIC[kind]} {curve[-1][1]:.3f}")
        model.train()

    cfg = TrainConfig(steps=c["steps"], lr=c["lr"], ema_decay=0.0, warmup_steps=0, final_lr_fraction=1.0,
                      log_every=min(c["eval_every"], 50), desc=f"{c['addon']} ({kind})")
    start = time.process_time()
    batches = L.caption_batches(codes, ids, c["batch_size"], c["seed"], lambda i: data.condition(kind, i))
    res = train(addon, loss_fn, batches, cfg, p, callback=callback)
    tail = res.losses[-100:]
    return {"final_loss": round(sum(tail) / len(tail), 5), "train_seconds": round(res.seconds, 1),
            "cpu_seconds": round(time.process_time() - start, 1), "steps": c["steps"],
            "batch_size": c["batch_size"], "adherence_by_step": curve,
            "parameters": sum(q.numel() for q in addon.parameters())}


def controlnet_recipe_name(kind: str) -> str:
    return f"shapes-controlnet-{_check_kind(kind)}"


def adapter_recipe_name(kind: str) -> str:
    return f"shapes-t2i-adapter-{_check_kind(kind)}"


CONTROLNET_RECIPES = {k: register(Recipe(
    controlnet_recipe_name(k), 1, _config(k, "controlnet"), build_addon, _train_addon,
    f"a ControlNet on the locked shapes-ldm-t2i for {k} maps: the base encoder's trainable copy joined by zero "
    "convolutions; captions dropped half of the time")) for k in CONTROLNET_KINDS}
ADAPTER_RECIPES = {k: register(Recipe(
    adapter_recipe_name(k), 1, _config(k, "adapter"), build_addon, _train_addon,
    f"a T2I-Adapter on the locked shapes-ldm-t2i for {k} maps, trained from scratch at ControlNet's budget")) for k in
    ADAPTER_KINDS}
CONTROLNET_EDGES, CONTROLNET_DEPTH = (CONTROLNET_RECIPES[k] for k in CONTROLNET_KINDS)
ADAPTER_EDGES, ADAPTER_DEPTH, ADAPTER_PALETTE = (ADAPTER_RECIPES[k] for k in ADAPTER_KINDS)
