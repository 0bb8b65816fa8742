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
# # 03 · Denoising Diffusion Implicit Models
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/diffusion-from-the-papers/diffusion-from-the-papers/blob/main/chapters/03_ddim.ipynb)
#
# **Paper.** Jiaming Song, Chenlin Meng, Stefano Ermon. *Denoising Diffusion Implicit Models.*
# ICLR 2021. [arXiv:2010.02502](https://arxiv.org/abs/2010.02502).
#
# **What you will learn.**
# - A family of *non-Markovian* forward processes $q_\sigma$ with exactly DDPM's marginals
#   $q(x_t \mid x_0)$, and why that makes a model trained with DDPM's $L_\text{simple}$ a valid model for
#   every one of them: no retraining.
# - The generalised sampler (DDIM eq. 12) with its knob $\eta$: $\eta = 1$ is DDPM, $\eta = 0$ is
#   deterministic, an ODE that can be run with few, large steps.
# - The paper's Table 1 in miniature: sample quality over the number of steps and $\eta$, with chapter
#   01's model as it is.
# - What determinism buys: the same $x_T$ gives the same digit at any number of steps; interpolating
#   $x_T$ interpolates digits; an image can be encoded into its $x_T$ and decoded back.
#
# **Prerequisites.** Chapter 01 (the forward process, the posterior, $L_\text{simple}$); chapter 02's
# respacing helps. The digit model `digits-ddpm` of chapter 01 is reused as it is.
#
# **Notation.** As in chapter 01's notation box: formulas are 1-based as in the papers, array index $t$
# holds the paper's step $t+1$, $\sigma_t$ is the noise one reverse step adds and $\bar\sigma_t$ the noise
# level of $x_t/\sqrt{\bar\alpha_t}$. This chapter writes the number of sampling steps $S$, as the DDIM paper
# does (chapter 02's $K$).
#
# **Run time** (measured by the book's build on a 2-core CPU, 6 December 2026:
# `benchmarks/results/runtimes/cpu.json`). `cpu`: 6.3 minutes in reading order (the chapter trains
# nothing: it samples chapter 01's DDPM, cached, and scores with its digit classifier); from an empty
# model cache, 9.1 minutes cold (it then trains those two first). `smoke`:
# under a minute; for a quick look on a laptop, set `DIFFUSION_PROFILE=smoke` before starting Jupyter,
# or `make lab PROFILE=smoke` (smoke models are barely trained: their numbers mean nothing). `gpu` about
# 10 minutes (not measured).

# %% [markdown]
# ## Setup
# One call picks the compute profile (`smoke`, `cpu` or `gpu`), the device and the seed; on Colab the
# first cell installs the book's package without touching Colab's torch.

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
import math

import matplotlib.pyplot as plt
import torch

import diffusion_core as dc
from diffusion_core import store, viz
from diffusion_core.evaluate.digits import digit_evaluator
from diffusion_core.experiments import ddim as claim
from diffusion_core.process import GaussianDiffusion, linear_betas
from diffusion_core.process.respacing import space_timesteps
from diffusion_core.samplers import ddim_sample, ddim_sigma, ddim_step, ddpm_sample, lerp, slerp
from diffusion_core.samplers.ddim import x0_eps_from_prediction
from diffusion_core.widgets import explore

profile = dc.setup()

# %% [markdown]
# ## 1. Many forward processes, one set of marginals
#
# DDPM's loss $L_\text{simple} = \mathbb E\,\|\epsilon - \epsilon_\theta(\sqrt{\bar\alpha_t}x_0 +
# \sqrt{1-\bar\alpha_t}\epsilon, t)\|^2$ only ever uses the *marginals* $q(x_t \mid x_0) =
# \mathcal N(\sqrt{\bar\alpha_t}x_0, (1-\bar\alpha_t)I)$, never the joint $q(x_{1:T} \mid x_0)$. So any
# other process with the same marginals would have led to the same training. DDIM builds a family of
# them, indexed by $\sigma = (\sigma_1, \dots, \sigma_T)$, by defining the process backwards (eq. 6-7):
#
# $$q_\sigma(x_{t-1} \mid x_t, x_0) = \mathcal N\Big(\sqrt{\bar\alpha_{t-1}}\,x_0 +
# \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\cdot\frac{x_t - \sqrt{\bar\alpha_t}\,x_0}{\sqrt{1-\bar\alpha_t}},\ \sigma_t^2 I\Big),
# \qquad q_\sigma(x_T \mid x_0) = \mathcal N(\sqrt{\bar\alpha_T}x_0, (1-\bar\alpha_T)I).$$
#
# (The paper writes $\alpha_t$ for the book's $\bar\alpha_t$. The formulas follow the paper's 1-based
# steps, $t = 1, \dots, T$, with $x_T$ the pure-noise end; the book's arrays hold the paper's step $t$ at
# index $t - 1$, as chapter 01's notation box says, and the code below indexes them that way.)
#
# **Why the marginals survive** (their Lemma 1), by induction from $t = T$ down: if
# $x_t = \sqrt{\bar\alpha_t}x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon$ with $\epsilon \sim \mathcal N(0, I)$,
# the fraction above is just $\epsilon$, so
# $x_{t-1} = \sqrt{\bar\alpha_{t-1}}x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\epsilon + \sigma_t z$, whose
# noise has variance $(1-\bar\alpha_{t-1}-\sigma_t^2) + \sigma_t^2 = 1-\bar\alpha_{t-1}$. Every $\sigma$
# gives the same $q(x_t \mid x_0)$.
#
# **Why it is not Markovian.** The forward step follows by Bayes' rule (eq. 8), or, since everything is
# jointly Gaussian given $x_0$, by conditioning: $\operatorname{Cov}(x_t, x_{t-1} \mid x_0) =
# \sqrt{1-\bar\alpha_t}\sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}$, so
#
# $$\mathbb E[x_t \mid x_{t-1}, x_0] = k_t\,x_{t-1} + \big(\sqrt{\bar\alpha_t} - k_t\sqrt{\bar\alpha_{t-1}}\big)\,x_0,
# \qquad k_t = \frac{\sqrt{1-\bar\alpha_t}\sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}}{1-\bar\alpha_{t-1}},
# \qquad \operatorname{Var}[x_t \mid x_{t-1}, x_0] = 1-\bar\alpha_t - k_t^2(1-\bar\alpha_{t-1}).$$
#
# In general $x_t$ depends on $x_0$ as well as on $x_{t-1}$. For exactly one choice, $\sigma_t^2 =
# \tilde\beta_t = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t$ (DDPM's posterior variance), $k_t =
# \sqrt{\alpha_t}$, the $x_0$ term vanishes and the variance is $\beta_t$: DDPM's Markov chain
# $q(x_t \mid x_{t-1}) = \mathcal N(\sqrt{\alpha_t}x_{t-1}, \beta_t I)$ is one member of the family.
# With $\sigma = 0$ the forward step is deterministic given $x_{t-1}$ and $x_0$, and needs both.
#
# **The same objective.** Take as the model's reverse step the same Gaussian with $x_0$ replaced by the
# network's guess, $p_\theta(x_{t-1}\mid x_t) = q_\sigma(x_{t-1} \mid x_t, \hat x_0)$ with
# $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta)/\sqrt{\bar\alpha_t}$. The two Gaussians share
# the variance $\sigma_t^2$, and their means differ by
#
# $$\sqrt{\bar\alpha_{t-1}}(x_0 - \hat x_0) + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,(\epsilon - \epsilon_\theta)
# = c_t\,(\epsilon - \epsilon_\theta),\qquad c_t = \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2} -
# \sqrt{\bar\alpha_{t-1}}\sqrt{\frac{1-\bar\alpha_t}{\bar\alpha_t}},$$
#
# because $x_0 - \hat x_0 = -\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}\,(\epsilon - \epsilon_\theta)$. So each KL
# term of the bound is $\frac{c_t^2}{2\sigma_t^2}\|\epsilon - \epsilon_\theta(x_t, t)\|^2$: a weight that
# depends on $t$ and $\sigma$ times the same squared error. The bound $J_\sigma$ is a weighted
# $L_\text{simple}$, up to a constant (Theorem 1). If $\epsilon_\theta$ does not share parameters across $t$,
# each term is minimised on its own whatever its weight, so the minimiser is the one of $L_\text{simple}$.
# A DDPM-trained network is therefore a (near-)optimal model for *every* $\sigma$ with $\sigma_t > 0$, and
# we may sample with whichever we like. At $\sigma = 0$ the weight $c_t^2/(2\sigma_t^2)$ is infinite and
# the bound is not defined: the deterministic sampler of the next section is reached only as the limit
# $\sigma \to 0$ of this family, and the argument says nothing about its quality beyond that.
#
# **Checks.** (a) On the full linear schedule, the forward step's $x_0$ coefficient and variance are
# those of DDPM's chain when $\sigma_t^2 = \tilde\beta_t$; with $\sigma = 0$ the variance is zero and the
# $x_0$ coefficient is not. (b) The gap between the means of $q_\sigma$ and $p_\theta$ is $c_t(\epsilon -
# \epsilon_\theta)$ for any $x_0$, $\epsilon$ and any network output. (c) By Monte Carlo, on a 1-D $x_0$:
# run $q_\sigma$ backwards over a 20-step subsequence from $x_T \sim q(x_T \mid x_0)$ with two different
# choices of $\sigma$, and compare the mean and variance of every $x_t$ with $q(x_t \mid x_0)$. The step
# is the package's `ddim_step` given the true $x_0$ and $\epsilon$, which is exactly the mean and noise of
# $q_\sigma$ above.

# %%
# NBVAL_CHECK_OUTPUT
base = GaussianDiffusion(linear_betas(1000))
ab_all, ab_prev_all = base.alpha_bar, base.alpha_bar_prev            # float64, (T,)
for t in range(1, 1000):
    a_t, a_prev, beta_t = ab_all[t].item(), ab_prev_all[t].item(), base.betas[t].item()
    for sigma_sq in (base.posterior_variance[t].item(), 0.0):
        # (a) E[x_t | x_{t-1}, x_0] = k x_{t-1} + (sqrt(alpha_bar_t) - k sqrt(alpha_bar_{t-1})) x_0
        k = math.sqrt(1 - a_t) * math.sqrt(1 - a_prev - sigma_sq) / (1 - a_prev)
        coef_x0, var = math.sqrt(a_t) - k * math.sqrt(a_prev), 1 - a_t - k**2 * (1 - a_prev)
        if sigma_sq > 0:   # sigma_t^2 = beta_tilde_t: DDPM's Markov chain N(sqrt(alpha_t) x_{t-1}, beta_t)
            assert abs(coef_x0) < 1e-9 and math.isclose(k, math.sqrt(1 - beta_t), rel_tol=1e-9), t
            assert math.isclose(var, beta_t, rel_tol=1e-6), (t, var, beta_t)
        else:              # sigma = 0: x_t is a function of x_{t-1} and x_0, and it needs x_0
            assert abs(var) < 1e-9 and coef_x0 < -1e-3 * math.sqrt(a_t), (t, coef_x0, var)

# (b) mean of q_sigma(x_{t-1} | x_t, x_0) minus mean of p_theta = c_t (eps - eps_theta), for any eps_theta
g_chk = torch.Generator().manual_seed(0)
for t in (1, 10, 250, 999):
    a_t, a_prev = ab_all[t].item(), ab_prev_all[t].item()
    for eta in (0.0, 0.5, 1.0):
        sigma = ddim_sigma(a_t, a_prev, eta)
        x0_v, eps_v, eps_theta = torch.randn(3, 5, 1, 4, 4, generator=g_chk, dtype=torch.float64)
        xt_v = math.sqrt(a_t) * x0_v + math.sqrt(1 - a_t) * eps_v
        x0_hat = (xt_v - math.sqrt(1 - a_t) * eps_theta) / math.sqrt(a_t)
        gap = ddim_step(x0_v, eps_v, a_prev, sigma) - ddim_step(x0_hat, eps_theta, a_prev, sigma)
        c_t = math.sqrt(1 - a_prev - sigma**2) - math.sqrt(a_prev) * math.sqrt((1 - a_t) / a_t)
        assert torch.allclose(gap, c_t * (eps_v - eps_theta), atol=1e-9), (t, eta)

# (c) Monte Carlo: every sigma keeps q(x_t | x_0) on a 20-step subsequence
tau = space_timesteps(1000, 20, "uniform")
ab = base.alpha_bar[tau]                        # alpha_bar on the subsequence
x0_1d = 0.6
g_mc = torch.Generator().manual_seed(0)
for sigma_rule in ("eta=0.5", "half of the room"):
    x = ab[-1].sqrt() * x0_1d + (1 - ab[-1]).sqrt() * torch.randn(400_000, generator=g_mc, dtype=torch.float64)
    for i in range(len(tau) - 1, 0, -1):
        a_t, a_prev = ab[i].item(), ab[i - 1].item()
        sigma = ddim_sigma(a_t, a_prev, 0.5) if sigma_rule == "eta=0.5" else math.sqrt(0.5 * (1 - a_prev))
        eps_true = (x - math.sqrt(a_t) * x0_1d) / math.sqrt(1 - a_t)
        x = ddim_step(torch.full_like(x, x0_1d), eps_true, a_prev, sigma, torch.randn(x.shape, generator=g_mc, dtype=torch.float64))
        # within 5 standard errors of the Monte Carlo estimates of the mean and the variance
        assert abs(x.mean().item() - math.sqrt(a_prev) * x0_1d) < 5 * math.sqrt((1 - a_prev) / x.numel()), (sigma_rule, i)
        assert abs(x.var().item() / (1 - a_prev) - 1) < 5 * math.sqrt(2 / x.numel()), (sigma_rule, i, x.var().item())

# %% [markdown]
# ## 2. The generalised sampler, and its knob $\eta$
#
# Replacing the unknown $x_0$ by the network's guess $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\epsilon_\theta)/\sqrt{\bar\alpha_t}$
# gives the sampler (eq. 12), on any subsequence $\tau$ of the training steps:
#
# $$x_{t-1} = \underbrace{\sqrt{\bar\alpha_{t-1}}\,\hat x_0}_{\text{predicted } x_0}
# + \underbrace{\sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\;\epsilon_\theta(x_t, t)}_{\text{direction pointing to } x_t}
# + \underbrace{\sigma_t z}_{\text{random noise}},\qquad
# \sigma_t(\eta) = \eta\sqrt{\frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}}\sqrt{1-\frac{\bar\alpha_t}{\bar\alpha_{t-1}}}\quad\text{(eq. 16)}.$$
#
# - $\eta = 1$: $\sigma_t^2$ is the posterior variance $\tilde\beta_t$ of the (respaced) process, and the
#   step is DDPM's ancestral step with the fixed-small variance;
# - $\eta = 0$: no noise at all: $x_T$ alone decides the sample. Written with $\bar x = x/\sqrt{\bar\alpha}$
#   and its noise level $\bar\sigma = \sqrt{1-\bar\alpha}/\sqrt{\bar\alpha}$ (so $\bar x_t = x_0 + \bar\sigma_t\epsilon$)
#   the step is $\bar x_{t-1} = \bar x_t + (\bar\sigma_{t-1} - \bar\sigma_t)\,\epsilon_\theta$: Euler's method for
#   the ODE $d\bar x = \epsilon_\theta\, d\bar\sigma$ (eq. 14).
#   Euler's method with large steps is still accurate when the path is smooth, which is why few steps
#   suffice, and an ODE can be run backwards, which is how images are encoded. (This ODE is a
#   discretisation of the probability-flow ODE of Song et al. 2021, DDIM Sec. 4.3; $\bar\sigma$ is the noise
#   level $\sigma$ in which Karras et al.'s EDM writes every sampler: the end of this section.)
#
# Here is one step as the package writes it, and the full sampler is `ddim_sample` (printed below).
#
# **Checks.** (a) $\eta = 1$ gives DDPM's posterior variance $\tilde\beta_t$ and, for the true $x_0$, the
# posterior mean $\tilde\mu_t$, on the full process and on a subsequence; (b) $\eta = 0$ is deterministic:
# different random generators give the identical sample; (c) so, with all $T = 1000$ steps, DDIM with
# $\eta = 1$ *is* DDPM's ancestral sampler (`ddpm_sample`, chapter 01) with the fixed-small variance
# $\tilde\beta_t$: the same network and the same noise give the same trajectory (section 4 uses this to
# compute that cell of the table once). The $\eta = 0$ step is checked against the Euler step at the end
# of the section.

# %%
print(inspect.getsource(ddim_step))

# %%
# NBVAL_CHECK_OUTPUT
# (a) eta = 1 is DDPM: sigma_t^2 = beta_tilde_t, and the step's mean is mu_tilde_t(x_t, x_0)
for process, steps_chk in ((base, range(1, 1000, 37)), (base.respace(tau), range(1, 20))):
    for t in steps_chk:
        a_t, a_prev = process.alpha_bar[t].item(), process.alpha_bar_prev[t].item()
        assert math.isclose(ddim_sigma(a_t, a_prev, 1.0) ** 2, process.posterior_variance[t].item(), rel_tol=1e-9)
        x0_v, eps_v = torch.randn(2, 3, 1, 4, 4, generator=g_chk, dtype=torch.float64)
        xt_v = math.sqrt(a_t) * x0_v + math.sqrt(1 - a_t) * eps_v
        mu_tilde, _, _ = process.q_posterior_mean_variance(x0_v, xt_v, torch.tensor(t))
        assert torch.allclose(ddim_step(x0_v, eps_v, a_prev, ddim_sigma(a_t, a_prev, 1.0)), mu_tilde, atol=1e-10)


# (b) eta = 0: the generator is never used, so two different ones give the same samples
def toy_eps(x, t):
    return torch.tanh(x.flip(-1) + t.reshape(-1, 1, 1, 1) / 500)


x_T_toy = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
runs = {(eta, seed): ddim_sample(toy_eps, base, x_T_toy, 10, eta=eta, generator=torch.Generator().manual_seed(seed),
                                 progress=False) for eta in (0.0, 1.0) for seed in (2, 3)}
assert torch.equal(runs[(0.0, 2)], runs[(0.0, 3)]) and not torch.allclose(runs[(1.0, 2)], runs[(1.0, 3)])

# (c) eta = 1 with all T steps = DDPM's ancestral sampler with beta_tilde_t ("fixed_small"), noise for noise
x_T_64 = x_T_toy.double()
ddim_eta1 = ddim_sample(toy_eps, base, x_T_64, 1000, eta=1.0, generator=torch.Generator().manual_seed(5), progress=False)
assert base.variance == "fixed_small"
ddpm_small = ddpm_sample(toy_eps, base, x_T_64, generator=torch.Generator().manual_seed(5), progress=False)
assert torch.allclose(ddim_eta1, ddpm_small, atol=1e-9), (ddim_eta1 - ddpm_small).abs().max()

# %%
print(inspect.getsource(ddim_sample))

# %% [markdown]
# **The sampler, from scratch.** Eq. 9, 16 and 12 over an evenly spaced subsequence, checked against
# `ddim_sample` with $\eta = 0.5$ in 10 steps, from the same $x_T$ and generator (both draw one $z$ per
# step, in the same order). Here `clip_denoised=False`; by default the package also clips $\hat x_0$ to
# $[-1, 1]$ and re-derives $\epsilon_\theta$ from it.

# %%
def ddim_from_scratch(eps_model, x_T, S, eta, generator):
    tau = space_timesteps(base.T, S, "uniform")                          # the subsequence, array indices
    ab = base.alpha_bar[tau].tolist()
    x = x_T
    for i in range(S - 1, -1, -1):
        a_t, a_prev = ab[i], (ab[i - 1] if i > 0 else 1.0)              # the last step lands on alpha_bar = 1
        eps = eps_model(x, tau[i].expand(x.shape[0]))
        x0_hat = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)                                  # eq. 9
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)          # eq. 16
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z       # eq. 12
    return x


ours = ddim_from_scratch(toy_eps, x_T_64, 10, 0.5, torch.Generator().manual_seed(6))
package = ddim_sample(toy_eps, base, x_T_64, 10, eta=0.5, generator=torch.Generator().manual_seed(6),
                      clip_denoised=False, progress=False)
torch.testing.assert_close(ours, package, rtol=1e-12, atol=1e-12)
print(f"DDIM from scratch vs ddim_sample (eta = 0.5, 10 steps): max |difference| {(ours - package).abs().max():.1e}")

# %% [markdown]
# ### One noise level for every sampler
#
# Karras et al. (EDM, 2022, Sec. 2 and Table 1) write every diffusion process as $x_t = s_t\,(x_0 +
# \sigma_t\epsilon)$, a scale times data plus noise of level $\sigma$, and every deterministic sampler as a
# solver of one ODE in $\sigma$. For DDPM's process $s_t = \sqrt{\bar\alpha_t}$, and their $\sigma$ is the
# book's $\bar\sigma_t = \sqrt{1-\bar\alpha_t}/\sqrt{\bar\alpha_t}$ (the bar keeps it apart from DDIM's $\sigma_t$,
# the noise one step adds). In the rescaled variable $\bar x = x/\sqrt{\bar\alpha} = x_0 + \bar\sigma\epsilon$
# the network is a denoiser $D(\bar x; \bar\sigma) = \hat x_0$, and the probability-flow ODE (EDM's eqs. 1
# and 3 with $s = 1$) is
#
# $$\frac{d\bar x}{d\bar\sigma} = \frac{\bar x - D(\bar x; \bar\sigma)}{\bar\sigma} = \hat\epsilon .$$
#
# What the network outputs, in these terms (the package's `x0_eps_from_prediction`):
#
# | `prediction` | the network's target | $\hat x_0 = D(\bar x_t; \bar\sigma_t)$ | $\hat\epsilon$ |
# |---|---|---|---|
# | `"eps"` (DDPM) | $\epsilon$ | $\bar x_t - \bar\sigma_t\,\hat\epsilon$ | the output |
# | `"x0"` | $x_0$ | the output | $(\bar x_t - \hat x_0)/\bar\sigma_t$ |
# | `"v"` (Salimans & Ho 2022) | $\sqrt{\bar\alpha_t}\,\epsilon - \sqrt{1-\bar\alpha_t}\,x_0$ | $\sqrt{\bar\alpha_t}\,x_t - \sqrt{1-\bar\alpha_t}\cdot$output | $\sqrt{1-\bar\alpha_t}\,x_t + \sqrt{\bar\alpha_t}\cdot$output |
#
# And one step from $\bar\sigma_t$ down to $\bar\sigma_{t-1}$: eq. 12 divided by $\sqrt{\bar\alpha_{t-1}}$.
#
# | sampler | $\sigma_t$ (the fresh noise, in $x$) | the step in $\bar x$ |
# |---|---|---|
# | DDIM, $\eta = 0$ | 0 | $\bar x_{t-1} = \bar x_t + (\bar\sigma_{t-1} - \bar\sigma_t)\,\hat\epsilon$: one Euler step of the ODE |
# | DDIM, $\eta$ | $\sigma_t(\eta)$, eq. 16 | $\bar x_{t-1} = \hat x_0 + \sqrt{\bar\sigma_{t-1}^2 - \sigma_t^2/\bar\alpha_{t-1}}\;\hat\epsilon + (\sigma_t/\sqrt{\bar\alpha_{t-1}})\,z$ |
# | DDPM, fixed small | $\sqrt{\tilde\beta_t}$ | DDIM with $\eta = 1$ (check (a)) |
# | DDPM, fixed large | $\sqrt{\beta_t}$ | DDIM $\eta = 1$'s mean plus noise of standard deviation $\sqrt{\beta_t/\bar\alpha_{t-1}}$ |
#
# In the DDIM rows the noise level lands on $\bar\sigma_{t-1}$ exactly (were $\hat x_0$ and $\hat\epsilon$ the
# true $x_0$ and $\epsilon$), whatever $\eta$; the fixed-large step overshoots it, to
# $\sqrt{\bar\sigma_{t-1}^2 + (\beta_t - \tilde\beta_t)/\bar\alpha_{t-1}}$, so it is not a member of the family.
# (On a subsequence, $\beta_t$ and $\tilde\beta_t$ are the respaced ones.)
#
# **Check** on random $x_t$ and network outputs: for each parameterisation, the package's $(\hat x_0,
# \hat\epsilon)$ satisfy $\hat x_0 = \bar x_t - \bar\sigma_t\hat\epsilon$; and the package's $\eta = 0$ step,
# divided by $\sqrt{\bar\alpha_{t-1}}$, is the Euler step of the ODE written with the denoiser,
# $\bar x_t + (\bar\sigma_{t-1} - \bar\sigma_t)(\bar x_t - D)/\bar\sigma_t$.

# %%
# NBVAL_CHECK_OUTPUT
for t in (1, 100, 999):
    a_t, a_prev = ab_all[t].item(), ab_prev_all[t].item()
    sig_t, sig_prev = math.sqrt((1 - a_t) / a_t), math.sqrt((1 - a_prev) / a_prev)    # sigma-bar: EDM's sigma
    xt_v, out = torch.randn(2, 3, 1, 4, 4, generator=g_chk, dtype=torch.float64)
    x_bar = xt_v / math.sqrt(a_t)
    for prediction in ("eps", "x0", "v"):                                              # the first table
        x0_hat, eps_hat = x0_eps_from_prediction(out, xt_v, prediction, a_t)
        assert torch.allclose(x0_hat, x_bar - sig_t * eps_hat, atol=1e-9), (t, prediction)
    euler = x_bar + (sig_prev - sig_t) * (x_bar - x0_hat) / sig_t                      # d x/d sigma = (x - D) / sigma
    assert torch.allclose(ddim_step(x0_hat, eps_hat, a_prev) / math.sqrt(a_prev), euler, atol=1e-9), t

# %% [markdown]
# **In diffusers.** `diffusion_core.interop.from_diffusers(DDIMScheduler(...))` converts a scheduler to an
# object whose `.sample(model, x_T, steps, eta)` reproduces diffusers' loop step for step, including a rule
# of its own: `DDIMScheduler` always steps from $t$ to $t - \lfloor T/S \rfloor$, whatever the spacing.
#
# | this book | diffusers |
# |---|---|
# | `ddim_sample(model, diffusion, x_T, S, eta=eta)` | `DDIMScheduler`: `scheduler.set_timesteps(S)`, then `x = scheduler.step(eps, t, x, eta=eta).prev_sample` for each `t` |
# | `spacing="uniform"`, `"leading"`, `"trailing"` | `timestep_spacing="linspace"`, `"leading"` (its default), `"trailing"` |
# | the last step lands on $\bar\alpha = 1$, i.e. on $\hat x_0$ | `set_alpha_to_one=True` (`False`: on `alphas_cumprod[0]`) |
# | `clip_denoised=True`, $\hat\epsilon$ re-derived from the clipped $\hat x_0$ | `clip_sample=True` with `use_clipped_model_output=True` (by default it keeps the network's $\hat\epsilon$) |
# | `prediction="x0"`, `"v"` | `prediction_type="sample"`, `"v_prediction"` |
# | `ddim_invert` | `DDIMInverseScheduler` |
# | $\bar\sigma_t$, and the $\eta = 0$ step in $\bar x$ | `EulerDiscreteScheduler`: its `sigmas` are $\bar\sigma_t$, its samples $\bar x$; with the same timesteps its `step` is DDIM's $\eta = 0$ step |

# %% [markdown]
# ## 3. Chapter 01's model, sampled with DDIM
#
# Nothing is retrained: `digits-ddpm` is DDPM in miniature (linear schedule, $T = 1000$, $L_\text{simple}$),
# loaded from the store (and trained now if chapter 01 has not run). Sixteen $x_T$, sampled with
# $\eta = 0$ in 10, 20 and 50 steps, and with DDPM's own ancestral sampler (variance $\beta_t$, as in
# chapter 01) in 50 respaced steps:

# %%
ddpm = store.load(claim.MODEL, profile)
x_T16 = claim.noise(ddpm, 16, seed=1)
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), layout="constrained")
for ax, (S, row) in zip(axes, ((10, 0.0), (20, 0.0), (50, 0.0), (50, claim.ANCESTRAL))):
    name = "DDIM, eta = 0" if row == 0.0 else "DDPM ancestral, beta_t"
    viz.image_grid(claim.generate(ddpm, x_T16, S, row, seed=0), nrow=4, ax=ax, title=f"{name}, {S} steps")
viz.show(fig)

# %% [markdown]
# ## 4. The claim in miniature: the paper's Table 1
#
# DDIM's Table 1 (CIFAR-10, one DDPM-trained model): FID over the number of steps $S$ for $\eta \in
# \{0, 0.2, 0.5, 1\}$ and for DDPM's ancestral sampler with its larger variance $\hat\sigma_t^2 = \beta_t$
# (on a subsequence, the respaced $\beta$). With $\eta = 0$, 50 steps come within 0.6 FID of 1000; the
# noisier samplers fall apart with few steps; with all 1000 steps the $\hat\sigma$ sampler is the best.
#
# Here: FD against the held-out digits (chapter 01's evaluator) over $S \in \{10, 20, 50, 100, 1000\}$
# for $\eta \in \{0, 0.5, 1\}$ and for DDPM's ancestral sampler with $\beta_t$, the variance in
# `digits-ddpm`'s recipe, which chapter 01 samples with. Evenly spaced subsequences; the network runs in bf16
# where the CPU or GPU has it (the profile's autocast).
#
# **The 1000-step ancestral reference.** The $\eta = 1$ cell at $S = 1000$ *is* DDPM's ancestral sampler
# with the fixed-small variance $\tilde\beta_t$ (check (c) of section 2: the same computation, so it is
# run once), and that is the reference the claim compares DDIM's 50 steps with. DDPM can also be sampled
# with the fixed-large $\beta_t$ (the last row; Ho et al. found the two variances about as good for
# $L_\text{simple}$). Its 1000-step cell costs another 1000 network calls per image, a quarter of the
# table, so it is measured at the `gpu` profile (where the claim then uses the better of the two
# references) and left out at `cpu` (exercise 1). (At `smoke`, which only checks that the code runs,
# the reference is the one row run with all 1000 steps.)
#
# **One sample size.** An FD depends on the number of samples behind it (fewer samples, larger FD), so
# every cell, the 1000-step reference among them, and the floor (real training digits) use the same
# `n` samples, and every cell starts from the same $x_T$. The floor is drawn five times to show how far
# an FD on `n` samples moves by chance. The same function gives `benchmarks/run.py --chapter 03`'s
# numbers.

# %%
evaluator = digit_evaluator(profile)
table = claim.fd_table(profile, seed=0, evaluator=evaluator)
steps, T, n = table["steps"], table["T"], table["n"]
floor, spread = table["references"]["fd_floor"], table["floor_spread"]
print(f"every cell on n = {n} samples from the same x_T; floor (n real digits) {floor:.2f}, "
      f"over 5 draws {spread['min']:.2f} to {spread['max']:.2f}")
print()
print(f"{'':14s}" + "".join(f"{S:>8d}" for S in steps) + "   | paper, CIFAR-10 FID (S = 10, 20, 50, 100, 1000)")
for row in claim.ROWS:
    cells = table["fd_table"][row]
    print(f"{claim.row_name(row):14s}" + "".join(f"{cells[S]:8.2f}" if S in cells else f"{'-':>8s}" for S in steps)
          + "   | " + " / ".join(f"{v:g}" for v in claim.PAPER_TABLE1[row].values()))

# %%
fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
for row in claim.ROWS:
    cells = table["fd_table"][row]
    ax.plot(list(cells), list(cells.values()), "o-", label=claim.row_name(row))
ax.axhline(floor, color="0.4", ls="--", label=f"floor ({n} real digits)")
ax.axhspan(spread["min"], spread["max"], color="0.85", zorder=0)
ax.set(title=f"FD over the number of steps, {n} samples per point", xlabel="steps S", ylabel="FD",
       xscale="log", yscale="log")
ax.grid(alpha=0.3)
ax.legend(fontsize="small")
viz.show(fig)

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), layout="constrained")
for ax, (row, S) in zip(axes, ((0.0, 10), (0.0, 50), (1.0, 10), (1.0, T))):
    viz.image_grid(table["samples"][row][S][:16], nrow=4, ax=ax,
                   title=f"{claim.row_name(row)}, S = {S}: FD {table['fd_table'][row][S]:.2f}")
viz.show(fig)

# %% [markdown]
# **The claim, measured.** DDIM with $\eta = 0$ and 50 steps against DDPM's ancestral sampler with
# all 1000 steps, on the same `n` samples: the ratio of their FDs (1 means equal quality; the paper's
# 50-step $\eta = 0$ against its 1000-step samplers gives 0.99 and 1.47, below). No pass mark is set:
# what the ratio can say depends on how much it would move with another draw of `n` images: a bootstrap
# resamples the `n` images (the same indices from both sets, since image $i$ of each starts from the same
# $x_T$) and recomputes the ratio, 500 times. Beside it, the sampling time per image (batches of `n`).

# %%
c = table["claim"]
print(f"FD DDIM (eta 0, 50 steps) {c['fd_ddim50']:.2f}; DDPM ancestral, 1000 steps: "
      + ", ".join(f"{variance} {fd:.2f}" for variance, fd in c["fd_references"].items()))
print(f"ratio {c['ratio']:.2f} against DDPM {c['reference']}; "
      f"90% paired bootstrap interval {c['interval'][0]:.2f} to {c['interval'][1]:.2f}")
sec = table["seconds"]
print(f"seconds per image: DDPM 1000 steps {sec[1.0][T] / n:.3f}, DDIM 50 steps {sec[0.0][50] / n:.4f}, "
      f"DDIM 10 steps {sec[0.0][10] / n:.4f}")
print()
from diffusion_core.reference import compare, reference_run  # noqa: E402

fd = table["fd_table"]
compare([(f"FD, {claim.row_name(row)}, S = {S}", claim.PAPER_TABLE1[row][S], ("fd_table", row, S), fd[row][S])
         for row in (0.0, 1.0) for S in (10, 50, T) if S in fd[row]]
        + [("FD, DDIM 50 / DDPM 1000", round(claim.PAPER_TABLE1[0.0][50] / claim.PAPER_TABLE1[1.0][1000], 2),
            ("ddim50_over_ddpm1000",), c["ratio"])],
        reference_run("03"), paper_label="paper (CIFAR-10 FID)")

# %% [markdown]
# *Reading (cpu profile, `benchmarks/run.py --chapter 03 --profile cpu --save`, saved in
# `benchmarks/results/03-cpu.json`; 300 samples per cell).* At `smoke` the model is barely trained and
# the table means nothing.
# - *Deterministic DDIM needs few steps.* With $\eta = 0$ the FD is about 5.3 at every $S$: 5.31 with
#   10 steps, 5.27 with 50, 5.35 with all 1000. Ten steps lose nothing measurable: a 16x16 digit is a
#   far simpler image than a photograph, and the ODE's path from $x_T$ to it is smooth enough for ten
#   Euler steps. But the curve is flat at a level that the stochastic samplers beat from 100 steps on
#   (next points): what limits $\eta = 0$ here is not the number of steps.
# - *The more noise, the more steps.* With 10 steps, $\eta = 1$ gives 8.55 and DDPM's sampler with
#   $\beta_t$ 27.5, against 5.31 for $\eta = 0$; the fixed-large sampler needs 100 steps (3.59). On a
#   coarse subsequence its variance, the respaced $\beta$, is much larger than the posterior variance
#   $\tilde\beta$ that $\eta = 1$ uses, and the few steps left cannot remove the excess noise. This is the
#   order of the paper's rows.
# - *With many steps, noise helps here; in the paper it does not.* At 100 steps $\eta = 1$ (3.27) and the
#   $\beta_t$ sampler (3.59) beat $\eta = 0$ at *every* step count (about 5.3), a gap of about 2 FD
#   units, larger than the noise described below; at 1000 steps $\eta = 1$ gives 4.40. This is where the
#   miniature departs from the paper (below). Why is not measured here. Two likely causes: our model is
#   trained far less (chapter 01's 1,000-step budget), so its $\epsilon_\theta$ has larger errors, and
#   fresh noise at every step pulls a trajectory back towards the noised data distribution while a
#   deterministic sampler carries every error of $\epsilon_\theta$ to the end (Karras et al. 2022, Sec.
#   4, make this argument for stochastic sampling); and FD here is computed with a small digit
#   classifier's features on 300 samples, which may weigh the smoothness of deterministic samples
#   differently from Inception features. Exercise 6 tests the first.
# - *What is noise.* The floor moves from 1.88 to 3.40 between five draws of 300 real digits, so
#   differences of about one FD unit are not resolved at this sample size: the $\eta = 0.5$ row, 4.01,
#   5.24 and 4.87 at 50, 100 and 1000 steps, is that noise, not a trend.
# - *The claim.* DDIM with 50 steps reaches 5.27 against 4.40 for DDPM's 1000-step ancestral sampler
#   (fixed-small variance): a ratio of 1.20, at 0.109 s per image against 1.28 s, about 12 times faster
#   (10 steps: 0.030 s, about 40 times). The bootstrap interval, 0.81 to 1.67, says how much weight the
#   ratio bears: it includes 1 (no difference) as well as a 67% worse FD. What 300 samples establish
#   is the size of the gap: 50 DDIM steps are about one FD unit, the size of the noise, from 1000
#   ancestral steps, at a twelfth of the cost. (These timings shared the machine with other jobs, one
#   thread each; the DDIM loop itself runs in 0.50 of the time of diffusers' `DDIMScheduler` loop on
#   the same network.)
#
# *The paper beside ours.* On CIFAR-10 (Table 1) $\eta = 0$ scores 13.36 at 10 steps against 4.04 at
# 1000; $\eta = 1$ is worse than $\eta = 0$ at every step count (5.78 against 4.16 at 100 steps, 4.73
# against 4.04 at 1000), $\hat\sigma$ (DDPM's $\beta_t$ sampler) at 100 steps is 9.99, and only
# $\hat\sigma$ with all 1000 steps (3.17) beats $\eta = 0$. The paper's 50-step $\eta = 0$ (4.67) against
# its 1000-step samplers gives ratios of 0.99 ($\eta = 1$) and 1.47 ($\hat\sigma$); ours, 1.20 against
# $\eta = 1$, is less favourable to DDIM than the paper's 0.99, for the reason of the third point above.
#
# ## 5. Consistency: $x_T$ is a latent code
#
# With $\eta = 0$ the map $x_T \mapsto x_0$ is deterministic and, because the ODE's path is smooth,
# nearly the same for every number of steps: the same $x_T$ gives the same digit at 10 and at 100 steps,
# with more detail (Sec. 5.2). With $\eta = 1$ the noise added along the way decides as much
# as $x_T$ does. Sixty-four $x_T$, each sampled with 10, 20, 50 and 100 steps: the mean absolute pixel
# difference from the 100-step image (pixels in $[-1, 1]$), and how often the evaluator's classifier
# reads the same digit as at 100 steps. The grids show eight of them, one row per $S$.

# %%
x_T64 = claim.noise(ddpm, 64, seed=2)
steps_c = (10, 20, 50, 100)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
for ax, eta in zip(axes, (0.0, 1.0)):
    cons = claim.consistency(ddpm, x_T64, steps_c, eta=eta, seed=0)
    labels = {S: evaluator.predict(x) for S, x in cons["images"].items()}
    viz.image_grid(torch.cat([cons["images"][S][:8] for S in steps_c]), nrow=8, ax=ax,
                   title=f"eta = {eta:g}: rows S = 10, 20, 50, 100")
    print(f"eta = {eta:g}, against S = 100: " + ", ".join(
        f"S = {S}: |difference| {cons['distance'][S]:.3f}, same digit {(labels[S] == labels[100]).float().mean():.0%}"
        for S in steps_c[:-1]))
viz.show(fig)

# %% [markdown]
# ## 6. Interpolation in $x_T$
#
# Because $x_T$ determines the digit, walking from one $x_T$ to another walks between digits (Sec. 5.3).
# The walk should stay where $x_T$ lives: in $d = 256$ dimensions a draw of $\mathcal N(0, I)$ has norm
# close to $\sqrt d = 16$, but the midpoint of the straight line between two draws has norm close to
# $\sqrt{d/2} \approx 11.3$, a place the sampler has never been. Spherical interpolation (slerp) keeps the
# norm.
#
# **Check:** slerp's midpoints keep the norm of the endpoints; the straight line's shrink by $\sqrt 2$.

# %%
# NBVAL_CHECK_OUTPUT
z0, z1 = torch.randn(2, 2000, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
mid_s, mid_l = slerp(z0, z1, 0.5), lerp(z0, z1, 0.5)
ratio_s = mid_s.norm(dim=1) / (0.5 * (z0.norm(dim=1) + z1.norm(dim=1)))
ratio_l = mid_l.norm(dim=1) / (0.5 * (z0.norm(dim=1) + z1.norm(dim=1)))
assert abs(ratio_s.mean().item() - 1) < 0.01 and abs(ratio_l.mean().item() * math.sqrt(2) - 1) < 0.02
assert torch.allclose(slerp(z0, z1, 0.0), z0) and torch.allclose(slerp(z0, z1, 1.0), z1)

# %%
weights = torch.linspace(0, 1, 9)                 # the interpolation weights
ends = claim.noise(ddpm, 2, seed=4).cpu()
paths = {"slerp": slerp(ends[:1], ends[1:], weights), "lerp": lerp(ends[:1], ends[1:], weights)}
fig, axes = plt.subplots(2, 1, figsize=(9, 3), layout="constrained")
for ax, (name, z) in zip(axes, paths.items()):
    images = claim.generate(ddpm, z.to(x_T64.device), 50, 0.0, seed=0)
    viz.image_grid(images, nrow=9, ax=ax, title=f"{name} between two x_T, DDIM 50 steps (norms "
                   + ", ".join(f"{v:.1f}" for v in z.flatten(1).norm(dim=1)[::2].tolist()) + ")")
viz.show(fig)

# %% [markdown]
# ## 7. Inversion: encoding an image into $x_T$
#
# Running the $\eta = 0$ ODE backwards, from $x_0$ up to $x_T$ (eq. 13 the other way,
# `ddim_invert`), encodes a real digit into a latent; sampling from that latent with the same steps
# decodes it. The two are exact inverses only in the limit of small steps, so the reconstruction error
# measures the discretisation: the paper's Table 2 reports it falling from 0.014 at 10 steps to 0.0001
# at 1000 (CIFAR-10, per dimension). Here: held-out digits, mean squared error per pixel with pixels in
# $[-1, 1]$; compare the trend over $S$ rather than the values, which depend on the data and its scale.
# Both directions run in float32, not bf16: the error to measure is the discretisation's, and bf16's
# rounding of $\epsilon_\theta$ at every step would add its own.

# %%
x_inv = claim.inversion_images(profile)
recon = claim.reconstruction_error(ddpm, x_inv, claim.inversion_steps(profile))
print(f"{len(x_inv)} held-out digits encoded and decoded in S steps; pixel MSE (images in [-1, 1])")
for S, r in recon.items():
    paper = claim.PAPER_RECONSTRUCTION.get(S)
    print(f"S = {S:5d}: MSE {r['mse']:.5f}   latent std {r['x_T'].std():.2f}" + (f"   | paper: {paper:g}" if paper else ""))
S_lo, S_hi = min(recon), max(recon)
shown_inv = torch.cat([x_inv[:10], recon[S_hi]["x_T"][:10].clamp(-3, 3) / 3, recon[S_lo]["reconstruction"][:10],
                       recon[S_hi]["reconstruction"][:10]])
viz.show_images(shown_inv, nrow=10, title=f"rows: digit; its x_T ({S_hi} steps, /3); encoded and decoded in {S_lo} steps; in {S_hi}")

# %% [markdown]
# At `cpu` the error falls from 0.045 at 10 steps to 0.012 at 20, 0.0019 at 50 and 0.0005 at 100: a
# ninety-fold drop from 10 to 100 steps, against sixteen-fold on CIFAR-10 (0.014 to 0.0009). Ten
# steps are coarse for a digit's sharp strokes; at 50 the root-mean-square error is 0.044 (pixels in
# $[-1, 1]$), about 6 of 255 grey levels, and at 100 it is 0.022, about 3. The latents look like noise
# (their standard deviation is close to 1), yet they hold the digit, up to that error: this is what
# lets later chapters edit real images by inverting them first.
#
# ## 8. Explore: $\eta$ and the number of steps
#
# The same sixteen $x_T$ redrawn for any $\eta$ and number of steps. With $\eta = 0$ the digits stay
# the same as the steps change; raise $\eta$ and they change with the steps too, and with few steps the
# noisy samplers give the worse digits that the table's left columns measured.


# %%
def draw(eta: float = 0.0, steps: int = 20):
    images = claim.generate(ddpm, x_T16, steps, eta, seed=0)
    return viz.image_grid(images, nrow=8, title=f"eta = {eta:g}, {steps} steps, the same x_T")


explore(draw, eta=(0.0, 1.0, 0.1, 0.0), steps=(2, 100, 1, 20))

# %% [markdown]
# ## Summary
# - DDPM's training only uses the marginals $q(x_t \mid x_0)$. DDIM's non-Markovian processes $q_\sigma$ share
#   them, so one network trained with $L_\text{simple}$ serves every $\sigma$: no retraining.
# - The generalised step $x_{t-1} = \sqrt{\bar\alpha_{t-1}}\hat x_0 + \sqrt{1-\bar\alpha_{t-1}-\sigma_t^2}\,\epsilon_\theta + \sigma_t z$,
#   with $\sigma_t(\eta)$: $\eta = 1$ is DDPM (fixed-small variance), $\eta = 0$ an ODE solved by Euler's
#   method, accurate with 10-50 large steps.
# - In miniature (`cpu`, 300 samples per FD): $\eta = 0$ gives the same FD, about 5.3, at every step count
#   from 10 to 1000, so DDIM's few-step advantage is reproduced at 10-50 steps; 50 DDIM steps reach 1.20
#   times the FD of DDPM's 1000 ancestral steps (a bootstrap puts the ratio anywhere from 0.81 to 1.67),
#   about 12 times faster. The noisier samplers need many steps; from 100 steps on they beat $\eta = 0$ here,
#   unlike the paper, where $\eta = 0$ is the best sampler at every step count but $\hat\sigma$ at 1000.
# - Deterministic sampling makes $x_T$ a latent code: consistent across step counts, interpolable with
#   slerp, and invertible by running the ODE backwards.
#
# ## Exercises
# 1. At `cpu`, measure the missing cell: DDPM's ancestral sampler with $\beta_t$ and all 1000 steps,
#    `evaluator.fd(claim.generate(ddpm, claim.noise(ddpm, n), 1000, "ddpm", batch=n))` (the table's
#    $x_T$). Is it better than the fixed-small reference, as $\hat\sigma$ is on CIFAR-10?
# 2. Add $\eta = 0.2$ to the table. Where between $\eta = 0$ and $0.5$ does it fall, and at which $S$?
# 3. Use `spacing="quadratic"` (the paper's choice for CIFAR-10) in `ddim_sample` for $S = 10$. Does it
#    help on digits, and why might it help more at low $S$?
# 4. Invert a digit with 20 steps and decode it with 100 (and the reverse). Which direction loses more?
# 5. Interpolate between the inverted latents of a 3 and an 8. Do the midpoints look like digits?
# 6. Train `digits-ddpm` four times longer (its recipe's `steps`, under another name) and measure the
#    $\eta = 0$ and $\eta = 1$ rows at 50 and 100 steps again. Does the stochastic samplers' advantage at
#    100 steps shrink, as it would if it came from the model's errors?
