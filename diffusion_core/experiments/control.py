"""Chapters 07 (ControlNet) and 08 (T2I-Adapter): spatial control of a locked model, in miniature.

Chapter 07 (Zhang, Rao & Agrawala 2023):

1. :func:`identity_at_init`: base + a fresh ControlNet gives the base's output bit for bit.
2. :func:`adherence` with the edge ControlNet: edge F1 of samples against their condition, for the
   base model given only the caption (the floor: the caption already names shape, size and
   position, so the floor is not zero), with the ControlNet, and for the real images (the ceiling);
   caption accuracy with and without control; the same with the empty caption (control alone).
3. The "sudden convergence": edge F1 over training steps, measured while the recipe trains
   (``stored.metrics["adherence_by_step"]``).
4. :func:`composition`: the edge and depth ControlNets together (their residuals add).
5. ``conditioning_scale``: the chapter's slider samples from fixed noise with :meth:`Setting.sample`.

Chapter 08 (Mou et al. 2023): :func:`adapter_report`: adherence of T2I-Adapters trained at the
ControlNets' budget, parameters, per-step sampling overhead (:func:`step_overhead`), two adapters
composed with weights, the palette condition, and features computed once for every step.

The bars each miniature must clear were fixed before any measurement (:data:`BARS`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..evaluate import control as M
from ..evaluate.attributes import shapes_evaluator
from ..models.controlnet import ControlNet
from ..models.t2i_adapter import T2IAdapter
from ..profiles import Profile
from ..recipes import control as C
from ..recipes import latent as L
from ..store import load

PAPER = {
    "controlnet": "ControlNet (Zhang et al. 2023): zero convolutions keep the locked model intact at the start; "
                  "the model 'suddenly' follows the condition after a few thousand steps (their Fig. 4, at about "
                  "6k steps); several ControlNets compose by adding their outputs",
    "t2i_adapter": "T2I-Adapter (Mou et al. 2023): 77M parameters against ControlNet's 361M, run once per "
                   "sampling rather than at every step, controllability comparable to ControlNet (their Tab. 1), "
                   "adapters compose with weights",
}

# fixed before any measurement (issue 9): the miniatures must clear these at the cpu profile
BARS = {
    "controlnet_f1_over_base": 0.2,        # edge F1 with control >= base's + 0.2
    "controlnet_f1_of_real": 0.5,          # ... and >= half of real images'
    "caption_kept": 0.8,                   # caption accuracy with control >= 0.8 x the base's
    "composition_f1_over_base": 0.1,       # two ControlNets composed: edge F1 >= base's + 0.1
    "adapter_params_of_controlnet": 0.5,   # T2I-Adapter parameters <= half of ControlNet's
    "adapter_f1_over_base": 0.1,           # T2I-Adapter edge F1 >= base's + 0.1
}


def sample_count(profile: Profile) -> int:
    return profile.pick(smoke=16, cpu=200, gpu=1000)


def sampling_steps(profile: Profile) -> int:
    return profile.pick(smoke=4, cpu=20, gpu=50)


class LockedBase:
    """The locked base model (chapter 04's text-to-image model), its autoencoder, process and tokenizer,
    and a fixed set of evaluation scenes (one object each, unseen in training) with their caption states
    and the empty caption's: what every add-on chapter (07, 08, 09) samples and scores on."""

    def __init__(self, profile: Profile, n: int | None = None, seed: int = 1):
        self.profile = profile
        self.stored, self.vae, self.diffusion = C.load_base(profile)
        self.base = self.stored.model
        self.device = next(self.base.parameters()).device
        self.tok = L.tokenizer_for(self.stored.config)
        world = L.world_for(profile, text=True, max_objects=self.stored.config["max_objects"])
        self.scenes = world.fixed(n or sample_count(profile), seed=seed, split="train")
        with torch.no_grad():
            self.context = self.encode(self.scenes.captions)
            self.null = self.encode([L.NULL_CAPTION])
        self.steps = sampling_steps(profile)

    def encode(self, captions: list[str]) -> torch.Tensor:
        return self.base.encode_text(self.tok.encode(list(captions)).to(self.device))


class Setting(LockedBase):
    """:class:`LockedBase` with the spatial conditions of its scenes and sampling with ControlNets or
    T2I-Adapters."""

    def cond(self, kind: str) -> torch.Tensor:
        return C.conditions(self.scenes, kind)

    def sample(self, addon=None, kinds: list[str] | str | None = None, scale: Any = 1.0, caption: bool = True,
               seed: int = 0, n: int | None = None) -> torch.Tensor:
        """Samples for the first ``n`` scenes (all by default), from the same noise whatever the add-on."""
        n = n or len(self.scenes)
        ctx = self.context[:n] if caption else self.null.expand(n, -1, -1)
        cond = None
        if kinds is not None:
            cond = [self.cond(k)[:n] for k in kinds] if isinstance(kinds, list) else self.cond(kinds)[:n]
        return C.sample(self.base, self.diffusion, self.vae, ctx, self.null, addon, cond, scale,
                        steps=self.steps, seed=seed, profile=self.profile)


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean())


def edge_f1(images: torch.Tensor, edges: torch.Tensor) -> dict[str, float]:
    s = M.edge_scores(M.edge_map(images), edges, tolerance=1)
    return {k: _mean(v) for k, v in s.items()}


# ------------------------------------------------------------------------------------------------
# chapter 07
# ------------------------------------------------------------------------------------------------
def identity_at_init(profile: Profile, n: int = 8, seed: int = 0) -> dict[str, Any]:
    """The paper's zero-convolution argument, checked on the book's model: the locked UNet's output
    with a freshly made ControlNet against without, on random latents, timesteps and captions."""
    stored, _, diffusion = C.load_base(profile)  # (outside no_grad: it may train the base first)
    with torch.no_grad():
        return _identity(stored, diffusion, profile, n, seed)


def _identity(stored, diffusion, profile: Profile, n: int, seed: int) -> dict[str, Any]:
    base = stored.model
    dev = next(base.parameters()).device
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ControlNet.from_unet(base.unet, 1, (16, 32, 32)).to(dev).eval()
    c = base.unet.config
    x = torch.randn(n, c.out_channels, c.sample_size, c.sample_size, generator=g).to(dev)
    t = torch.randint(0, diffusion.T, (n,), generator=g).to(dev)
    world = L.world_for(profile, text=True, max_objects=stored.config["max_objects"])
    scenes = world.fixed(n, seed=seed + 3)
    ctx = base.encode_text(L.tokenizer_for(stored.config).encode(scenes.captions).to(dev))
    cond = scenes.edges.to(dev)
    plain = base(x, t, context=ctx)
    with_control = base(x, t, context=ctx, **C.unet_kwargs(base, net, x, t, ctx, cond))
    return {"max_abs_diff": float((plain - with_control).abs().max()), "equal": bool(torch.equal(plain, with_control)),
            "parameters": sum(p.numel() for p in net.parameters()),
            "base_unet_parameters": sum(p.numel() for p in base.unet.parameters())}


def load_controlnet(kind: str, profile: Profile):
    return load(C.controlnet_recipe_name(kind), profile, device=profile.device)


def load_adapter(kind: str, profile: Profile):
    return load(C.adapter_recipe_name(kind), profile, device=profile.device)


def adherence(profile: Profile, setting: Setting | None = None, seed: int = 0) -> dict[str, Any]:
    """Chapter 07's central measurement (edges): base (the floor), ControlNet, real (the ceiling), with
    and without the caption; caption accuracy with and without control."""
    s = setting or Setting(profile)
    net = load_controlnet("edges", profile)
    evaluator = shapes_evaluator(profile)
    edges = s.cond("edges")
    out: dict[str, Any] = {"n": len(s.scenes), "sampling_steps": s.steps}
    images = {
        "base": s.sample(seed=seed),
        "control": s.sample(net.model, "edges", seed=seed),
        "base_no_caption": s.sample(caption=False, seed=seed),
        "control_no_caption": s.sample(net.model, "edges", caption=False, seed=seed),
        "real": s.scenes.images,
    }
    for name, im in images.items():
        out[f"edges_{name}"] = edge_f1(im, edges)
    for name in ("base", "control", "real"):
        out[f"caption_accuracy_{name}"] = evaluator.caption_accuracy(images[name], s.scenes)
        out[f"position_accuracy_{name}"] = evaluator.matches(images[name], s.scenes, ("position",)).float().mean().item()
    out["samples"] = {k: v[:16] for k, v in images.items()}
    out["conditions"] = edges[:16]
    out["captions"] = s.scenes.captions[:16]
    out["adherence_by_step"] = net.metrics.get("adherence_by_step", [])
    out["train"] = {k: net.metrics.get(k) for k in ("train_seconds", "cpu_seconds", "steps", "batch_size", "parameters")}
    return out


def composition(profile: Profile, setting: Setting | None = None, seed: int = 0,
                scales: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """The edge and the depth ControlNets together (MultiControlNet: residuals add), against each
    alone and the base: edge F1 and depth error of the samples."""
    s = setting or Setting(profile)
    edges_net, depth_net = load_controlnet("edges", profile).model, load_controlnet("depth", profile).model
    edges, depth = s.cond("edges"), s.cond("depth")
    runs = {
        "base": s.sample(seed=seed),
        "edges": s.sample(edges_net, "edges", seed=seed),
        "depth": s.sample(depth_net, "depth", seed=seed),
        "both": s.sample([edges_net, depth_net], ["edges", "depth"], list(scales), seed=seed),
    }
    out: dict[str, Any] = {"scales": list(scales)}
    for name, im in runs.items():
        out[name] = {"edge_f1": edge_f1(im, edges)["f1"], "depth_error": _mean(M.depth_error(im, depth))}
    out["real"] = {"edge_f1": edge_f1(s.scenes.images, edges)["f1"],
                   "depth_error": _mean(M.depth_error(s.scenes.images, depth))}
    out["samples"] = {k: v[:8] for k, v in runs.items()}
    return out


def step_overhead(profile: Profile, addon: str, batch: int = 64, steps: int = 20, repeats: int | None = None,
                  seed: int = 0) -> dict[str, float]:
    """Sampling time per step with the add-on over without (the same batch, guidance and steps; the
    adapter's features are computed once per run and counted in). Runs interleave; medians."""
    s = Setting(profile, n=batch)  # (outside no_grad: loading may train)
    nets = {"controlnet": lambda: load_controlnet("edges", profile).model,
            "adapter": lambda: load_adapter("edges", profile).model}
    net = nets[addon]()
    repeats = repeats or profile.pick(smoke=1, cpu=5, gpu=5)
    s.steps = steps
    plain, with_addon = [], []
    s.sample(n=batch, seed=seed)  # warm-up
    for _ in range(repeats):
        for runs, a, k in ((plain, None, None), (with_addon, net, "edges")):
            start = time.perf_counter()
            s.sample(a, k, n=batch, seed=seed)
            runs.append(time.perf_counter() - start)
    p, w = sorted(plain)[len(plain) // 2], sorted(with_addon)[len(with_addon) // 2]
    return {"ratio": w / p, "seconds_per_step_base": p / steps, "seconds_per_step_addon": w / steps}


# ------------------------------------------------------------------------------------------------
# chapter 08
# ------------------------------------------------------------------------------------------------
def adapter_report(profile: Profile, setting: Setting | None = None, seed: int = 0,
                   weights: tuple[float, float] = (1.0, 1.0)) -> dict[str, Any]:
    """T2I-Adapters at the ControlNets' budget: edge F1 (adapter vs ControlNet vs base vs real),
    caption accuracy, parameters and training seconds, palette error (adapter vs base), two adapters
    (edges + palette) composed with ``weights``, and the features-once check."""
    s = setting or Setting(profile)
    evaluator = shapes_evaluator(profile)
    a_edges, a_depth, a_pal = (load_adapter(k, profile) for k in ("edges", "depth", "palette"))
    cn = load_controlnet("edges", profile)
    edges, palette, depth = s.cond("edges"), s.cond("palette"), s.cond("depth")
    runs = {
        "base": s.sample(seed=seed),
        "adapter": s.sample(a_edges.model, "edges", seed=seed),
        "controlnet": s.sample(cn.model, "edges", seed=seed),
        "adapter_depth": s.sample(a_depth.model, "depth", seed=seed),
        "palette": s.sample(a_pal.model, "palette", seed=seed),
        "edges_and_palette": s.sample([a_edges.model, a_pal.model], ["edges", "palette"], list(weights), seed=seed),
    }
    out: dict[str, Any] = {"n": len(s.scenes), "weights": list(weights)}
    for name, im in runs.items():
        out[name] = {"edge_f1": edge_f1(im, edges)["f1"], "palette_error": _mean(M.palette_error(im, palette)),
                     "depth_error": _mean(M.depth_error(im, depth)),
                     "caption_accuracy": evaluator.caption_accuracy(im, s.scenes)}
    real = s.scenes.images
    out["real"] = {"edge_f1": edge_f1(real, edges)["f1"], "palette_error": _mean(M.palette_error(real, palette)),
                   "depth_error": _mean(M.depth_error(real, depth)),
                   "caption_accuracy": evaluator.caption_accuracy(real, s.scenes)}
    out["params"] = {"adapter": a_edges.metrics.get("parameters"), "controlnet": cn.metrics.get("parameters")}
    out["train"] = {"adapter": {k: a_edges.metrics.get(k) for k in ("train_seconds", "cpu_seconds", "steps", "batch_size")},
                    "controlnet": {k: cn.metrics.get(k) for k in ("train_seconds", "cpu_seconds", "steps", "batch_size")}}
    out["adherence_by_step"] = {"adapter": a_edges.metrics.get("adherence_by_step", []),
                                "controlnet": cn.metrics.get("adherence_by_step", [])}
    out["samples"] = {k: v[:8] for k, v in runs.items()}
    out["features_once"] = features_once(a_edges.model, edges[:8].to(s.device))
    return out


@torch.no_grad()
def features_once(adapter: T2IAdapter, cond: torch.Tensor) -> dict[str, Any]:
    """The adapter sees only the condition (no x_t, no t): its features at the first step equal those
    at any other step, so one run serves the whole sampling loop. Checked by recomputing them."""
    first = adapter(cond)
    again = adapter(cond)
    return {"max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(first, again)),
            "inputs": "condition only", "shapes": [tuple(f.shape) for f in first]}


def verdicts(ch07: dict[str, Any] | None = None, ch08: dict[str, Any] | None = None) -> dict[str, bool]:
    """Each bar of :data:`BARS` against the measured numbers (True: cleared)."""
    v: dict[str, bool] = {}
    if ch07 is not None:
        base, ctrl, real = (ch07[f"edge_f1_{k}"] for k in ("base", "control", "real"))
        v["controlnet_f1_over_base"] = ctrl >= base + BARS["controlnet_f1_over_base"]
        v["controlnet_f1_of_real"] = ctrl >= BARS["controlnet_f1_of_real"] * real
        v["caption_kept"] = ch07["caption_accuracy_control"] >= BARS["caption_kept"] * ch07["caption_accuracy_base"]
        v["composition_f1_over_base"] = ch07["composition_f1_edges"] >= base + BARS["composition_f1_over_base"]
    if ch08 is not None:
        v["adapter_params_of_controlnet"] = (ch08["params_adapter"]
                                             <= BARS["adapter_params_of_controlnet"] * ch08["params_controlnet"])
        v["adapter_overhead_below_controlnet"] = ch08["adapter_step_overhead"] < ch08["controlnet_step_overhead"]
        v["adapter_f1_over_base"] = ch08["edge_f1_adapter"] >= ch08["edge_f1_base"] + BARS["adapter_f1_over_base"]
    return v
