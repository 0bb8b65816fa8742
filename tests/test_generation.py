"""The shared generation loop (diffusion_core.experiments.generation) behind chapters 01-06's six
sampling helpers: each helper, now written through it, gives bit-identical samples to its own loop as
it was before (copied below as the reference), with autocast on and off and with batches that split n
unevenly. Committed benchmark numbers depend on these samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from diffusion_core import store
from diffusion_core.experiments import ddim, ddpm, generation, guidance, improved, latent
from diffusion_core.process.respacing import space_timesteps
from diffusion_core.profiles import Profile, current
from diffusion_core.recipes import guidance as G
from diffusion_core.recipes import latent as R
from diffusion_core.recipes.digits import diffusion_for
from diffusion_core.samplers.ancestral import ddpm_sample
from diffusion_core.samplers.ddim import ddim_sample
from diffusion_core.samplers.guidance import cfg_eps, check_scale, guided_sample
from diffusion_core.samplers.guidance import float_output as _float_out
from diffusion_core.store import device_of

CPU = Profile("cpu", torch.device("cpu"))


@pytest.fixture(params=["0", "1"], ids=["fp32", "amp"])
def amp(request, monkeypatch):
    """Autocast off, or on (bf16 on the CPU, even where it is emulated)."""
    monkeypatch.setenv("DIFFUSION_AMP", request.param)
    assert CPU.amp == (request.param == "1")
    return request.param == "1"


# ------------------------------------------------------------------------------------------------
# Stub models: a 1x1 convolution (autocast runs it in bf16) and a smooth nonlinearity
# ------------------------------------------------------------------------------------------------

class Eps(nn.Module):
    def __init__(self, channels: int = 1, out: int | None = None, classes: int = 0, width: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(channels, out or channels, 1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.classes = nn.Embedding(classes, 1) if classes else None
        self.text = nn.Embedding(64, width) if width else None
        self.proj = nn.Linear(width, channels) if width else None
        self.text_proj = nn.Linear(width, width) if width else None

    def forward(self, x, t, class_labels=None, context=None):
        h = self.conv(torch.tanh(x + t.reshape(-1, 1, 1, 1).float() / 100))
        if class_labels is not None:
            h = h + self.classes(class_labels.expand(x.shape[0])).reshape(-1, 1, 1, 1)
        if context is not None:
            h = h + self.proj(context.mean(1)).reshape(-1, h.shape[1], 1, 1)
        return h

    def encode_text(self, ids):
        return torch.tanh(self.text_proj(self.text(ids)))


class Decoder(nn.Module):
    scaling_factor = 0.7

    def __init__(self, latent: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(latent, 3, 1)

    def decode(self, z):
        return nn.functional.interpolate(self.conv(z), scale_factor=4)


def digit_stub(T: int = 40, variance: str = "fixed_large") -> store.Stored:
    config = {"schedule": "linear", "T": T, "prediction": "eps", "variance": variance, "resolution": 8}
    return store.Stored(Eps().eval(), "digits-ddpm", "smoke", config, {}, Path("stub"), False)


def cfg_stub() -> store.Stored:
    config = {**G.DIGITS_CFG_P01.config(CPU), "resolution": 8}
    return store.Stored(Eps(classes=config["num_classes"] + 1).eval(), G.digits_recipe_name(0.1), "smoke", config,
                        {}, Path("stub"), False)


def t2i_stub() -> store.Stored:
    config = R.T2I_RECIPES[0.1].config(CPU)
    return store.Stored(Eps(channels=4, width=8).eval(), "shapes-ldm-t2i", "smoke", config, {}, Path("stub"), False)


# ------------------------------------------------------------------------------------------------
# The six loops as they were (bodies copied from before the shared loop)
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def ref_ddpm_sample_digits(stored, n, steps, seed=0, batch=1000, progress=True, profile=None):
    profile = profile or current()
    model = stored.model.eval()
    dev = next(model.parameters()).device
    process = ddpm.sampling_process(stored.diffusion, steps)
    R = stored.config["resolution"]
    g = torch.Generator(device=dev).manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        x_T = torch.randn(min(batch, n - i), 1, R, R, generator=g, device=dev)
        with profile.autocast():
            out.append(ddpm_sample(model, process, x_T, generator=g, progress=progress).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def ref_improved_ancestral(stored, process, n, seed=0, batch=500, progress=False, profile=None):
    profile = profile or current()
    model, dev = stored.model.eval(), device_of(stored)
    R = stored.config["resolution"]
    g = torch.Generator(device=dev).manual_seed(seed)
    x_T = torch.randn(n, 1, R, R, generator=g, device=dev)
    out = []
    for i in range(0, n, batch):
        with profile.autocast():
            out.append(ddpm_sample(model, process, x_T[i:i + batch], generator=g, progress=progress).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def ref_ddim_generate(stored, x_T, steps, eta, seed=0, batch=500, progress=False, profile=None):
    profile = profile or current()
    diffusion = stored.diffusion
    tau = space_timesteps(diffusion.T, steps, "uniform")
    g = torch.Generator(device=x_T.device).manual_seed(seed + 1)
    model = stored.model.eval()
    out = []
    for i in range(0, x_T.shape[0], batch):
        x = x_T[i:i + batch]
        with profile.autocast():
            if eta == ddim.ANCESTRAL:
                large = diffusion_for({**stored.config, "variance": "fixed_large"})
                process = large if steps >= large.T else large.respace(tau)
                y = ddpm_sample(model, process, x, generator=g, progress=progress)
            else:
                y = ddim_sample(model, diffusion, x, eta=float(eta), timesteps=tau, generator=g, progress=progress)
        out.append(y.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def ref_guidance_sample_digits(stored, labels, scale, steps, seed=0, batch=500, progress=False, profile=None):
    profile = profile or current()
    scale = check_scale(scale)
    labels = torch.as_tensor(labels)
    model = stored.model.eval()
    dev = device_of(model)
    R = stored.config["resolution"]
    g = torch.Generator(device=dev).manual_seed(seed)
    x_T = torch.randn(len(labels), 1, R, R, generator=g, device=dev)
    null = torch.tensor(stored.config["null_class"], device=dev)
    diffusion = stored.diffusion
    out = []
    for i in range(0, len(labels), batch):
        y = labels[i:i + batch].to(dev)
        with profile.autocast():
            x0 = guided_sample(_float_out(model), diffusion, x_T[i:i + batch], y, null, scale, steps, clip_denoised=True,
                               progress=progress)
        out.append(x0.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def ref_latent_generate(model, vae, f, resolution, n, steps, seed=0, batch=250, progress=False,
                        model_kwargs=None, profile=None, process=None):
    profile = profile or current()
    process = process or R.latent_diffusion()
    model.eval()
    dev = device_of(model)
    shape = R.latent_shape(f, resolution)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch):
        x_T = torch.randn(min(batch, n - i), *shape, generator=g).to(dev)
        with profile.autocast():
            x0 = ddim_sample(model, process, x_T, steps, eta=0.0, clip_denoised=(f == 1),
                             progress=progress, model_kwargs=model_kwargs).float()
        out.append(latent.decode(vae, x0.cpu()))
    return torch.cat(out)


@torch.no_grad()
def ref_generate_from_captions(stored, vae, captions, steps, scale=1.0, seed=0, batch=250, progress=False,
                               profile=None):
    profile = profile or current()
    scale = check_scale(scale)
    model = stored.model.eval()
    c = stored.config
    dev = device_of(model)
    shape = R.latent_shape(c["f"], c["resolution"])
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(captions), batch):
        ctx, null = latent.encode_captions(stored, captions[i:i + batch])
        x_T = torch.randn(len(ctx), *shape, generator=g).to(dev)

        def eps(x, t, ctx=ctx, null=null):
            return cfg_eps(lambda xx, tt, cc: model(xx, tt, context=cc).float(), x, t, ctx, null, scale)

        with profile.autocast():
            z0 = ddim_sample(eps, stored.diffusion, x_T, steps, eta=0.0, clip_denoised=False,
                             progress=progress).float()
        out.append(latent.decode(vae, z0.cpu()))
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------
# Identity
# ------------------------------------------------------------------------------------------------

def same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b), (a - b).abs().max()


@pytest.mark.parametrize("batch", [7, 3, 20])
def test_ddpm_sample_digits_is_unchanged(amp, batch):
    s = digit_stub(T=40)
    same(ddpm.sample_digits(s, 7, 5, seed=2, batch=batch, progress=False, profile=CPU),
         ref_ddpm_sample_digits(s, 7, 5, seed=2, batch=batch, progress=False, profile=CPU))


@pytest.mark.parametrize("batch", [7, 3])
@pytest.mark.parametrize("variance", ["fixed_small", "learned_range"])
def test_improved_ancestral_is_unchanged(amp, batch, variance):
    s = digit_stub(T=30, variance=variance)
    if variance == "learned_range":
        s.model.conv = nn.Conv2d(1, 2, 1)
    process = improved.respaced(s, variance, 6)
    same(improved.ancestral(s, process, 7, seed=3, batch=batch, profile=CPU),
         ref_improved_ancestral(s, process, 7, seed=3, batch=batch, profile=CPU))


@pytest.mark.parametrize("batch", [7, 3])
@pytest.mark.parametrize("eta", [0.0, 0.5, ddim.ANCESTRAL])
@pytest.mark.parametrize("steps", [6, 40])
def test_ddim_generate_is_unchanged(amp, batch, eta, steps):
    s = digit_stub(T=40)
    x_T = ddim.noise(s, 7, seed=1)
    same(ddim.generate(s, x_T, steps, eta, seed=4, batch=batch, profile=CPU),
         ref_ddim_generate(s, x_T, steps, eta, seed=4, batch=batch, profile=CPU))


@pytest.mark.parametrize("batch", [7, 3])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_guidance_sample_digits_is_unchanged(amp, batch, scale):
    s = cfg_stub()
    labels = torch.arange(7) % 10
    same(guidance.sample_digits(s, labels, scale, 4, seed=5, batch=batch, profile=CPU),
         ref_guidance_sample_digits(s, labels, scale, 4, seed=5, batch=batch, profile=CPU))


@pytest.mark.parametrize("batch", [7, 3])
@pytest.mark.parametrize("f", [1, 4])
def test_latent_generate_is_unchanged(amp, batch, f):
    model = Eps(channels=R.latent_shape(f, 16)[0]).eval()
    vae = None if f == 1 else Decoder().eval()
    process = R.latent_diffusion("scaled_linear")
    same(latent.generate(model, vae, f, 16, 7, 4, seed=6, batch=batch, profile=CPU, process=process),
         ref_latent_generate(model, vae, f, 16, 7, 4, seed=6, batch=batch, profile=CPU, process=process))
    if f == 1:  # the default process and model_kwargs
        kw = {"class_labels": None}
        same(latent.generate(model, vae, f, 16, 5, 3, batch=batch, profile=CPU, model_kwargs=kw),
             ref_latent_generate(model, vae, f, 16, 5, 3, batch=batch, profile=CPU, model_kwargs=kw))


@pytest.mark.parametrize("batch", [5, 2])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_generate_from_captions_is_unchanged(amp, batch, scale):
    s, vae = t2i_stub(), Decoder().eval()
    captions = ["a red circle", "a blue square", "a small green triangle", "a red circle", "a big blue circle"]
    same(latent.generate_from_captions(s, vae, captions, 3, scale, seed=7, batch=batch, profile=CPU),
         ref_generate_from_captions(s, vae, captions, 3, scale, seed=7, batch=batch, profile=CPU))


def test_the_stubs_are_sensitive_to_what_the_identity_tests_guard(monkeypatch):
    """The identity tests would catch a changed order: with amp, the network's output differs from float32,
    and another seed or another batch split of per-batch noise gives other samples."""
    monkeypatch.setenv("DIFFUSION_AMP", "1")
    s = digit_stub(T=40)
    amp_out = ref_ddpm_sample_digits(s, 7, 5, batch=3, progress=False, profile=CPU)
    monkeypatch.setenv("DIFFUSION_AMP", "0")
    assert not torch.equal(amp_out, ref_ddpm_sample_digits(s, 7, 5, batch=3, progress=False, profile=CPU))
    assert not torch.equal(ref_ddpm_sample_digits(s, 7, 5, batch=3, progress=False, profile=CPU),
                           ref_ddpm_sample_digits(s, 7, 5, batch=7, progress=False, profile=CPU))
    # the decoder and the caption encoder run outside autocast: inside, they would give other numbers
    vae, z, text = Decoder().eval(), torch.randn(2, 4, 4, 4), t2i_stub().model
    ids = torch.tensor([[1, 4, 40, 17, 2, 0]])
    monkeypatch.setenv("DIFFUSION_AMP", "1")
    with torch.no_grad(), CPU.autocast():
        decoded, encoded = vae.decode(z).float(), text.encode_text(ids).float()
    with torch.no_grad():
        assert not torch.equal(decoded, vae.decode(z)) and not torch.equal(encoded, text.encode_text(ids))


# ------------------------------------------------------------------------------------------------
# The loop itself
# ------------------------------------------------------------------------------------------------

def test_generate_orders_condition_noise_sampler_decode_and_needs_n_for_drawn_noise(monkeypatch):
    monkeypatch.setenv("DIFFUSION_AMP", "1")
    calls = []

    def condition(i, j):
        calls.append(("condition", torch.is_autocast_enabled("cpu"), i, j))
        return j - i

    def draw(k):
        calls.append(("noise", torch.is_autocast_enabled("cpu"), k))
        return torch.zeros(k, 2)

    def sample(x, cond):
        calls.append(("sample", torch.is_autocast_enabled("cpu"), cond))
        return x.to(torch.bfloat16) + 1

    def decode(x0):
        calls.append(("decode", torch.is_autocast_enabled("cpu"), x0.dtype))
        return x0 * 2

    out = generation.generate(sample, draw, batch=2, n=3, profile=CPU, condition=condition, decode=decode)
    assert out.dtype == torch.float32 and out.shape == (3, 2) and torch.equal(out, torch.full((3, 2), 2.0))
    assert calls == [("condition", False, 0, 2), ("noise", False, 2), ("sample", True, 2), ("decode", False, torch.float32),
                     ("condition", False, 2, 3), ("noise", False, 1), ("sample", True, 1), ("decode", False, torch.float32)]
    with pytest.raises(TypeError, match="n is required"):
        generation.generate(sample, draw, batch=2, profile=CPU)
    sliced = generation.generate(lambda x, _: x * 3, torch.arange(5.0), batch=2, profile=CPU)
    assert torch.equal(sliced, torch.arange(5.0) * 3)


def test_gaussian_draws_on_the_generators_device_in_the_sizes_asked():
    """Per-batch draws are not slices of one draw (torch.randn fills 16 or more values another way),
    which is why the loop leaves it to each caller whether x_T is drawn at once or per batch."""
    draw = generation.gaussian(torch.Generator().manual_seed(0), (2, 3), "cpu")
    a, b = draw(4), draw(1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(a, torch.randn(4, 2, 3, generator=g)) and torch.equal(b, torch.randn(1, 2, 3, generator=g))
    assert not torch.equal(torch.cat([a, b]), torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0)))


def test_generate_refuses_a_batch_that_is_not_a_positive_int():
    from diffusion_core.experiments.generation import generate
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch"):
            generate(lambda x, c: x, torch.zeros(3, 1), batch=bad)
