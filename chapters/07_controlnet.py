# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · ControlNet: spatial control for a locked model
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/diffusion-from-the-papers/diffusion-from-the-papers/blob/main/chapters/07_controlnet.ipynb)
#
# **Paper.** Lvmin Zhang, Anyi Rao, Maneesh Agrawala. *Adding Conditional Control to Text-to-Image
# Diffusion Models.* ICCV 2023. [arXiv:2302.05543](https://arxiv.org/abs/2302.05543).
#
# **What you will learn.**
# - How to add a new condition (an edge map, a depth map) to a trained text-to-image model without
#   touching its weights: *lock* the model, train a *copy* of its encoder on the condition, and join
#   the copy to the model through *zero convolutions*.
# - Why a zero convolution is harmless at the start (base + fresh ControlNet = base, bit for bit)
#   and still learns (its weight gradient is not zero), and why everything behind it waits one step.
# - The paper's observations in miniature: adherence to the condition measured against a floor and
#   a ceiling, the caption still obeyed, the "sudden convergence" over training, two ControlNets
#   composed by adding their outputs, and a knob (`conditioning_scale`) that dials control in.
#
# **Prerequisites.** Chapter 04 (the conditional UNet, the autoencoder and the text-to-image model this
# chapter controls), chapter 06 (classifier-free guidance, used when sampling).
#
# **Run time** (measured by the book's build on a 2-core CPU, 6 December 2026:
# `benchmarks/results/runtimes/cpu.json`). `cpu`: 3.8 minutes in reading order (chapter 04's text-to-image
# model, autoencoder and evaluator cached; the chapter trains its two ControlNets, 104 and 83 s); from an
# empty model cache, 10.6 minutes cold (it then also trains chapter 04's three). `smoke`: under a minute;
# for a quick look on a laptop, set `DIFFUSION_PROFILE=smoke` before starting Jupyter, or `make lab
# PROFILE=smoke` (smoke models are barely trained: their numbers mean nothing). `gpu` about 10 minutes (not
# measured). The ControlNets are cached and chapters 08 and 09 reuse them.

# %% [markdown]
# ## Setup

# %%
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # the package only: Colab's torch already meets its lower bound and is kept
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "git+https://github.com/diffusion-from-the-papers/diffusion-from-the-papers"], check=True)

# %%
import inspect

import matplotlib.pyplot as plt
import torch

import diffusion_core as dc
from diffusion_core import viz
from diffusion_core.evaluate import control as metrics
from diffusion_core.experiments import control as claim
from diffusion_core.models.controlnet import ControlNet, MultiControlNet
from diffusion_core.recipes import control as recipes
from diffusion_core.widgets import explore

profile = dc.setup()

# %% [markdown]
# ## 1. The idea: lock, copy, connect with zeros
#
# A trained text-to-image model $\epsilon_\theta(z_t, t, c_\text{text})$ is expensive and good. We want
# it to also obey a spatial condition $c$ (where the edges are, how deep each pixel is) without
# losing what it knows, from far less data than it was trained on. ControlNet's answer, for one
# network block $\mathcal F(\cdot;\Theta)$ mapping features $x$ to $y$ (the paper's eqs. 1-2):
#
# $$y = \mathcal F(x;\Theta) \quad\longrightarrow\quad
#   y_c = \mathcal F(x;\Theta) + \mathcal Z\big(\mathcal F(x + \mathcal Z(c;\Theta_{z1});\Theta_c);\Theta_{z2}\big)$$
#
# - $\Theta$ is **locked** (frozen); $\Theta_c$ is a **trainable copy**, initialised to $\Theta$.
# - $\mathcal Z(\cdot;\Theta_z)$ is a **zero convolution**: a $1\times 1$ convolution whose weight and
#   bias start at 0.
#
# For Stable Diffusion the "block" is the whole UNet encoder: the copy runs the encoder on
# $z_t + \mathcal Z(E(c))$, where $E$ is a small convolutional net that brings the condition image down to
# the latent grid, and one zero convolution per skip connection (and one for the middle block)
# hands its features to the locked UNet, which *adds* them to its own skip connections. In this
# package a `ControlNet` is literally the UNet's encoder class (`UNetEncoder`) plus those three
# pieces; `ControlNet.from_unet` copies the encoder's weights.

# %%
src = inspect.getsource(ControlNet.forward)
print(src[src.index("        emb = self.time_embed"):src.index("        if guess_mode")])

# %% [markdown]
# The same computation written out by hand on the book's model, checked against the package. The base
# is chapter 04's text-to-image model (loaded, or trained on first use); the ControlNet here is a
# fresh copy with random (not zero) output convolutions, so that the check is not trivially $0 = 0$.

# %%
stored, vae, diffusion = recipes.load_base(profile)
base = stored.model
dev = next(base.parameters()).device
setting = claim.Setting(profile)

torch.manual_seed(0)
net = ControlNet.from_unet(base.unet, conditioning_channels=1, conditioning_embedding_out_channels=(16, 32, 32)).to(dev)
with torch.no_grad():
    for zc in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
        zc.weight.normal_(0, 0.05)

x = torch.randn(4, 4, 8, 8, device=dev)
t = torch.tensor([10, 200, 500, 900], device=dev)
ctx = setting.context[:4]
cond = setting.cond("edges")[:4].to(dev)
with torch.no_grad():
    # by hand: the copy's encoder on conv_in(z) + Z(E(c)), one zero conv per skip, then the locked UNet
    xin = base.unet_input(x)                              # z_t with the coordinate channels of chapter 04
    emb = net.time_embed(xin, t)
    h = net.conv_in(xin) + net.controlnet_cond_embedding(cond)
    skips = [h]
    for block in net.down_blocks:
        h, block_skips = block(h, emb, ctx)
        skips += block_skips
    h = net.mid_block(h, emb, ctx)
    down = [z(s) for z, s in zip(net.controlnet_down_blocks, skips)]
    mid = net.controlnet_mid_block(h)
    by_hand = base(x, t, context=ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    d2, m2 = net(xin, t, ctx, cond)
    package = base(x, t, context=ctx, down_block_additional_residuals=d2, mid_block_additional_residual=m2)
print(f"{len(down)} skip residuals + 1 middle; max |by hand - package| = {(by_hand - package).abs().max():.2e}")
assert torch.allclose(by_hand, package, atol=1e-5)

# %% [markdown]
# ## 2. Why zero convolutions: harmless at first, and still learning
#
# At initialisation every zero convolution outputs 0, so $y_c = y$: the locked model is exactly
# itself, and no random feature from an untrained branch ever reaches it ("no harmful noise", as
# the paper puts it). Does a layer that starts at zero ever move? For one zero convolution
# $y = W x + b$ with $W = 0$, $b = 0$ and a loss $\mathcal L$:
#
# $$\frac{\partial\mathcal L}{\partial W} = \frac{\partial\mathcal L}{\partial y}\,x^\top,\qquad
#   \frac{\partial\mathcal L}{\partial b} = \frac{\partial\mathcal L}{\partial y},\qquad
#   \frac{\partial\mathcal L}{\partial x} = W^\top\frac{\partial\mathcal L}{\partial y} = 0 .$$
#
# The weight's gradient is non-zero as long as the input $x$ (the copy's features) is, so the first
# step makes $W \ne 0$. The gradient *through* the zero convolution to the copy behind it is zero at
# that first step, so for one step only the output convolutions learn; from the second step on the
# whole copy does. The check below computes all three gradients by autograd and by the formulas.

# %%
g = torch.Generator().manual_seed(0)
zconv = torch.nn.Conv2d(3, 2, 1)
torch.nn.init.zeros_(zconv.weight)
torch.nn.init.zeros_(zconv.bias)
x_in = torch.randn(5, 3, 4, 4, generator=g, requires_grad=True)
target = torch.randn(5, 2, 4, 4, generator=g)
y = zconv(x_in)
loss = (y - target).square().sum()
loss.backward()
dL_dy = 2 * (y - target).detach()                                          # (B, 2, H, W)
dW = torch.einsum("bohw,bihw->oi", dL_dy, x_in.detach())[..., None, None]  # dL/dy x^T, summed over pixels
checks = {
    "dL/dW = dL/dy x^T": torch.allclose(zconv.weight.grad, dW, atol=1e-5),
    "dL/db = dL/dy": torch.allclose(zconv.bias.grad, dL_dy.sum((0, 2, 3)), atol=1e-5),
    "dL/dW is non-zero": bool(zconv.weight.grad.abs().sum() > 0),
    "dL/dx is exactly zero": bool((x_in.grad == 0).all()),
}
for k, v in checks.items():
    print(f"{k}: {v}")
assert all(checks.values())

# %% [markdown]
# And on the book's model: a fresh ControlNet leaves the locked text-to-image UNet **bit for bit**
# unchanged (`torch.equal`, not `allclose`), for random latents, timesteps and captions.

# %%
ident = claim.identity_at_init(profile)
print(f"max |base - (base + fresh ControlNet)| = {ident['max_abs_diff']}, identical: {ident['equal']}")
print(f"ControlNet parameters {ident['parameters']:,} (the encoder copy + E + zero convs); "
      f"the locked UNet has {ident['base_unet_parameters']:,}")
assert ident["equal"]

# %% [markdown]
# ## 3. Conditions from the shapes world
#
# The base model draws one object on a background from a caption ("a large red circle at the top
# left"). The shapes world also gives each scene spatial maps: the **edges** of the object (like a
# Canny map) and a **depth**-like map (nearer is brighter: the object stands in front of a ground
# plane). Both are 32x32; the condition embedding $E$ (three stages, 4x down) brings them to the
# 8x8 latent grid. Note that a caption already says roughly where the object is and how big; the
# edges add its exact outline.

# %%
show = setting.scenes[:8]
fig, axes = plt.subplots(3, 1, figsize=(8, 3.6))
viz.image_grid(show.images, nrow=8, ax=axes[0], title="scenes")
viz.image_grid(show.edges * 2 - 1, nrow=8, ax=axes[1], title="edges")
viz.image_grid(show.depth * 2 - 1, nrow=8, ax=axes[2], title="depth")
fig.tight_layout()
viz.show(fig)
print("\n".join(show.captions[:4]))

# %% [markdown]
# ## 4. Training: the copy learns, the base stays locked
#
# `shapes-controlnet-edges` and `shapes-controlnet-depth` are store recipes: trained on first use,
# cached. Each copies the base encoder, then trains it (AdamW, constant learning rate, no EMA) with
# L_simple on the base model's own training scenes and their maps, the locked model's prediction as
# the output. As in the paper, half of the captions are replaced by the empty caption, so the copy
# has to read the condition rather than lean on the caption. Every few hundred steps the recipe
# samples a fixed batch of unseen conditions and records their edge F1: the curve below.

# %%
cn_edges = claim.load_controlnet("edges", profile)
cn_depth = claim.load_controlnet("depth", profile)
for name, s in (("edges", cn_edges), ("depth", cn_depth)):
    m = s.metrics
    print(f"{name}: {m['steps']} steps of batch {m['batch_size']}, {m['train_seconds']} s, "
          f"{m['parameters']:,} trainable parameters, final loss {m['final_loss']}")

# %% [markdown]
# **How adherence is measured.** A sample's edges are taken exactly as the world takes them from a
# scene: segment the sample by colour against its background (each row's median colour; an object
# covers at most a third of a row), then mark object pixels whose 4-neighbourhood leaves the object.
# An edge pixel counts as right if the condition has one within one pixel (and vice versa for
# recall); F1 combines the two. On the real images this recovers the condition almost exactly (the
# ceiling below); a model that ignores the condition still scores something, because the caption
# names the object's size and cell (the floor).

# %%
curve = torch.tensor(cn_edges.metrics["adherence_by_step"])
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(curve[:, 0], curve[:, 1], "o-", label="ControlNet (edges)")
ax.set_xlabel("training step")
ax.set_ylabel(f"edge F1 ({recipes.control_budget(profile)['eval_n']} unseen conditions)")
ax.set_title("adherence over training")
ax.grid(alpha=0.3)
ax.legend()
viz.show(fig)
jumps = (curve[1:, 1] - curve[:-1, 1])
k = int(jumps.argmax())
print(f"largest jump between evaluations: {float(curve[k, 1]):.3f} -> {float(curve[k + 1, 1]):.3f} "
      f"(steps {int(curve[k, 0])} -> {int(curve[k + 1, 0])}); first {float(curve[0, 1]):.3f}, last {float(curve[-1, 1]):.3f}")

# %% [markdown]
# *Reading (cpu profile, `benchmarks/run.py --chapter 07 --profile cpu --save`, saved in
# `benchmarks/results/07-cpu.json`; one thread).* Edge F1 of 48 unseen
# conditions stays at the caption-only level for 200 steps (0.38, 0.40, 0.38 at steps 0, 100, 200), then
# jumps to 0.86 at step 300 and 0.93 at step 400, and sits at 0.94-0.95 from there to step 1,200: a
# sudden convergence, in 100-200 steps out of 1,200. Where it jumps depends on the seed and the learning
# rate: one run cannot say more.
#
# *The paper's figure beside ours.* The paper saw its jump at about 6,000 steps (Fig. 4), with a model a
# thousand times larger and a learning rate of 1e-5 against our 3e-4; what carries over is the shape of
# the curve, not the step count.

# %% [markdown]
# ## 5. The claim in miniature: control without forgetting the caption
#
# The same unseen scenes, the same starting noise, classifier-free guidance at $s = 3$ (chapter 06),
# 20 DDIM steps: the base model given the caption only, the base with the edge ControlNet, and the
# same two with the empty caption.

# %%
adh = claim.adherence(profile, setting, seed=profile.seed)
rows = [("base (caption only): the floor", "base"), ("base + ControlNet", "control"),
        ("base, empty caption", "base_no_caption"), ("ControlNet, empty caption", "control_no_caption"),
        ("real images: the ceiling", "real")]
print(f"{'':34s} {'precision':>9s} {'recall':>7s} {'F1':>6s}")
for label, key in rows:
    e = adh[f"edges_{key}"]
    print(f"{label:34s} {e['precision']:9.3f} {e['recall']:7.3f} {e['f1']:6.3f}")
print(f"caption accuracy: base {adh['caption_accuracy_base']:.3f}, with ControlNet {adh['caption_accuracy_control']:.3f}, "
      f"real {adh['caption_accuracy_real']:.3f}   ({adh['n']} scenes)")

# %%
fig, axes = plt.subplots(4, 1, figsize=(8, 4.6))
viz.image_grid(adh["conditions"][:8] * 2 - 1, nrow=8, ax=axes[0], title="condition (edges)")
viz.image_grid(adh["samples"]["base"][:8], nrow=8, ax=axes[1], title="base, caption only")
viz.image_grid(adh["samples"]["control"][:8], nrow=8, ax=axes[2], title="base + ControlNet")
viz.image_grid(adh["samples"]["control_no_caption"][:8], nrow=8, ax=axes[3], title="ControlNet, empty caption")
fig.tight_layout()
viz.show(fig)

# %% [markdown]
# The bars were fixed before any of these numbers was measured (`claim.BARS`): edge F1 with
# control at least the base's + 0.2 and at least half of the real images'; caption accuracy with
# control at least 0.8 of the base's.

# %%
bars = {
    "edge F1 >= base + 0.2": adh["edges_control"]["f1"] >= adh["edges_base"]["f1"] + claim.BARS["controlnet_f1_over_base"],
    "edge F1 >= 0.5 x real": adh["edges_control"]["f1"] >= claim.BARS["controlnet_f1_of_real"] * adh["edges_real"]["f1"],
    "caption accuracy >= 0.8 x base": adh["caption_accuracy_control"]
    >= claim.BARS["caption_kept"] * adh["caption_accuracy_base"],
}
for k, v in bars.items():
    print(f"{k}: {'cleared' if v else 'NOT cleared'}")

# %% [markdown]
# *Reading (cpu profile, 200 unseen scenes).* With its caption alone the base model draws the outline
# the condition asks for with an edge F1 of 0.39 (precision and recall alike): the caption names the
# object's shape, size and cell, so an honest floor is well above zero. The ControlNet lifts it to
# 0.95 (precision 0.95, recall 0.95) against 1.00 for the real images, the ceiling. With the empty caption
# the floor drops to 0.08 and the ControlNet still reaches 0.88: the copy reads the condition, not the
# caption (half of its training captions were empty). The caption is not lost: caption accuracy (every
# attribute right, judged by the shapes evaluator) rises from 0.35 to 0.80, because the edges fix shape
# and position, where this base model is weakest, while the colour still comes from the caption. (This
# base model, retrained in this run, names position right only 0.43 of the time at $s = 3$; chapter 04's
# reading, from an earlier training run of the same recipe, reports 0.99: how reliably the recipe learns
# position is a question for chapter 04.) All three bars are cleared.
#
# *The paper's figure beside ours.* The paper shows its claims as pictures (Figs. 1, 4, 7) and a
# user study rather than one adherence number; a later measurement of the released SD 1.5
# segmentation ControlNet (Li et al. 2024, ControlNet++, Tab. 1) found 32.6 mIoU of its samples'
# segmentations against 50.7 for real images: control at about 0.64 of the real-image ceiling,
# the same kind of ratio as our edge F1 over the real images' (0.95).

# %% [markdown]
# ## 6. Two ControlNets at once
#
# ControlNets trained separately compose without any retraining: each gets its own condition, and the
# locked UNet receives the *sum* of their residuals (diffusers' `MultiControlNetModel`; here
# `MultiControlNet`). Edges say where the outline is, depth says which pixels are the object and how
# near; both come from the same scene.

# %%
comp = claim.composition(profile, setting, seed=profile.seed)
print(f"{'':10s} {'edge F1':>8s} {'depth error':>12s}")
for k in ("base", "edges", "depth", "both", "real"):
    print(f"{k:10s} {comp[k]['edge_f1']:8.3f} {comp[k]['depth_error']:12.4f}")
fig, axes = plt.subplots(4, 1, figsize=(8, 4.6))
for ax, k in zip(axes, ("base", "edges", "depth", "both")):
    viz.image_grid(comp["samples"][k][:8], nrow=8, ax=ax, title=k)
fig.tight_layout()
viz.show(fig)

# %% [markdown]
# *Reading (cpu profile).* Each ControlNet alone already brings the other's measure most of the way:
# edges alone cut the depth error from 0.040 (base) to 0.012, depth alone lifts edge F1 from 0.39 to 0.95,
# since both maps fix the object's outline. Together they do better on both counts (edge F1 0.98, depth
# error 0.010) with no retraining: their residuals simply add. The bar (composed edge F1 at least the
# base's + 0.1) is cleared.
#
# The depth error is measured the way the world makes depth: the sample's own segmentation, its
# centroid row and its size class (from the segmented area) give the depth map the world would have
# drawn for it; the error is the mean absolute difference to the condition, per pixel.

# %% [markdown]
# ## 7. Dialling control in: `conditioning_scale`
#
# Every residual is multiplied by `conditioning_scale` before the UNet adds it: 0 is the base model,
# 1 is what was trained, above 1 is extrapolation. Move the slider: the same noise and captions each
# time (the first row of the previous figures).

# %%
sweep_scales = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
_sweep: dict[float, torch.Tensor] = {}
sweep_n = 8


def show_scale(scale: float = 1.0):
    scale = min(sweep_scales, key=lambda s: abs(s - scale))
    if scale not in _sweep:
        _sweep[scale] = setting.sample(cn_edges.model, "edges", scale, seed=profile.seed, n=sweep_n)
    f1 = claim.edge_f1(_sweep[scale], setting.cond("edges")[:sweep_n])["f1"]
    fig, axes = plt.subplots(2, 1, figsize=(8, 2.4))
    viz.image_grid(setting.cond("edges")[:sweep_n] * 2 - 1, nrow=sweep_n, ax=axes[0], title="condition")
    viz.image_grid(_sweep[scale], nrow=sweep_n, ax=axes[1], title=f"conditioning_scale = {scale:g}: edge F1 {f1:.2f}")
    fig.tight_layout()
    return fig


explore(show_scale, scale=(0.0, 2.0, 0.25, 1.0))

# %% [markdown]
# ## 8. What control costs per sampling step
#
# The ControlNet runs at every sampling step (its input is $z_t$), so each step pays for the
# locked UNet *and* the copy of its encoder: about half of a UNet more.

# %%
ov = claim.step_overhead(profile, "controlnet", batch=64, steps=10)
print(f"sampling time per step with the ControlNet / without: {ov['ratio']:.2f} "
      f"({ov['seconds_per_step_base'] * 1000:.1f} ms per step without, batch 64 with guidance)")

# %% [markdown]
# ## 9. The full-size ControlNet
#
# The class that trained the small copy above builds the public SD 1.5 ControlNets, whose
# parameter names match diffusers' `ControlNetModel` (the tests check outputs against diffusers with
# every weight random, and `interop.from_diffusers` converts one).

# %%
from diffusion_core import presets  # noqa: E402

full = presets.build("controlnet-sd15")   # on the meta device: no memory
print(f"controlnet-sd15: {presets.count_parameters(full):,} parameters "
      f"(the SD 1.5 UNet: {presets.count_parameters(presets.build('sd15-unet')):,})")

# %% [markdown]
# ## Summary
# - A ControlNet is a trainable copy of a locked model's encoder; it reads $z_t + \mathcal Z(E(c))$ and
#   hands one residual per skip connection (plus the middle) to the locked UNet through zero
#   convolutions.
# - Zero convolutions make the fresh ControlNet an exact no-op, yet their weight gradient
#   $\partial\mathcal L/\partial y\,x^\top$ is not zero, so training starts at once; the copy behind
#   them starts learning one step later.
# - In miniature: the edge ControlNet raises edge F1 well above the caption-only floor while the caption
#   is still obeyed; two ControlNets add; `conditioning_scale` interpolates between the base and the
#   controlled model; each sampling step costs about one and a half UNet evaluations.
#
# ## Exercises
# 1. Replace the zero convolutions by convolutions with a small random initialisation
#    (`torch.nn.init.normal_(w, 0, 0.02)`) and train `shapes-controlnet-edges`'s recipe for 200 steps.
#    Sample with the fresh and the trained copy: what does the "harmful noise" look like at step 0?
# 2. The paper drops 50% of captions. Retrain with `p_drop_caption = 0` and compare the edge F1 with
#    the empty caption (the last rows of section 5's table). Why does the ControlNet then lean on the
#    caption?
# 3. Feed the edges of one scene with the caption of another (a different shape and colour). Which
#    wins, the condition or the caption, at `conditioning_scale` 0.5, 1 and 2?
# 4. `guess_mode=True` scales the residuals from 0.1 (the first skip) to 1.0 (the middle). Sample with
#    the empty caption in guess mode. Does adherence change?
# 5. Compose the edge ControlNet with the depth ControlNet of a *different* scene. What does the model
#    draw when the two conditions disagree?
# 6. Count the parameters of a ControlNet built for this UNet and compare with the UNet: what fraction
#    of the UNet is its encoder? Compare with the SD 1.5 numbers of section 9.
