"""Classifier-free guidance: the batched rule equals two separate forwards; s=1 and s=0 are the
conditional and unconditional models; condition dropout drops at the requested rate."""

import pytest
import torch

from diffusion_core.samplers.guidance import cfg_eps, drop_condition


class ToyModel(torch.nn.Module):
    """eps(x, t, c) that depends on all three, with a batch-independent forward."""

    def __init__(self, num_classes: int = 5, channels: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(num_classes + 1, channels, generator=g))
        self.calls: list[int] = []

    def forward(self, x, t, c):
        self.calls.append(x.shape[0])
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return torch.tanh(x) * (1 + t / 100) + self.emb[c][:, :, None, None]


def _inputs(b=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, 5, 5, generator=g), torch.tensor([3, 10, 50, 99]), torch.tensor([0, 1, 2, 4])


def test_cfg_equals_two_separate_forwards_and_uses_one_batched_call():
    model = ToyModel()
    x, t, c = _inputs()
    null = torch.tensor(5)
    s = 3.5
    eps = cfg_eps(model, x, t, c, null, s)
    assert model.calls == [8]  # ONE forward, batch 2B
    eps_c = model(x, t, c)
    eps_u = model(x, t, torch.full_like(c, 5))
    torch.testing.assert_close(eps, eps_u + s * (eps_c - eps_u))
    # Ho & Salimans' form with w = s - 1
    w = s - 1
    torch.testing.assert_close(eps, (1 + w) * eps_c - w * eps_u)


def test_cfg_scale_one_is_conditional_and_scale_zero_is_unconditional():
    model = ToyModel()
    x, t, c = _inputs()
    torch.testing.assert_close(cfg_eps(model, x, t, c, 5, 1.0), model(x, t, c), rtol=0, atol=0)
    torch.testing.assert_close(
        cfg_eps(model, x, t, c, 5, 0.0), model(x, t, torch.full_like(c, 5)), rtol=0, atol=0
    )
    # a per-sample scale tensor takes the batched path and gives the same answers
    s = torch.tensor([1.0, 0.0, 1.0, 0.0])
    eps = cfg_eps(model, x, t, c, 5, s)
    torch.testing.assert_close(eps[0], model(x, t, c)[0])
    torch.testing.assert_close(eps[1], model(x, t, torch.full_like(c, 5))[1])


def test_cfg_with_dict_condition_and_unbatched_null_embedding():
    def model_fn(x, t, cond):
        return x + cond["text"].mean(1)[:, :, None, None]

    x = torch.randn(2, 4, 3, 3)
    text = torch.randn(2, 7, 4)
    null = torch.zeros(7, 4)  # one null embedding, broadcast over the batch
    eps = cfg_eps(model_fn, x, 0, {"text": text}, {"text": null}, 2.0)
    eps_c, eps_u = model_fn(x, 0, {"text": text}), x
    torch.testing.assert_close(eps, eps_u + 2.0 * (eps_c - eps_u))


def test_cfg_guides_only_eps_channels_when_model_also_predicts_variance():
    def model_fn(x, t, c):
        return torch.cat([x * c[:, None, None, None], -x * c[:, None, None, None]], dim=1)

    x = torch.randn(2, 3, 4, 4)
    c = torch.tensor([2.0, 3.0])
    out = cfg_eps(model_fn, x, 0, c, torch.tensor(0.0), 4.0, eps_channels=3)
    torch.testing.assert_close(out[:, :3], 4.0 * model_fn(x, 0, c)[:, :3])
    torch.testing.assert_close(out[:, 3:], model_fn(x, 0, c)[:, 3:])


def test_cfg_rejects_null_condition_of_wrong_shape():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="null_cond has shape"):
        cfg_eps(lambda x, t, c: x, x, 0, torch.randn(2, 7, 4), torch.zeros(6, 4), 2.0)


def test_drop_condition_drops_at_the_requested_rate_reproducibly():
    c = torch.arange(10).repeat(1000)
    d1 = drop_condition(c, 10, 0.2, torch.Generator().manual_seed(0))
    d2 = drop_condition(c, 10, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(d1, d2)
    dropped = d1 == 10
    assert abs(dropped.float().mean().item() - 0.2) < 0.02
    assert torch.equal(d1[~dropped], c[~dropped])
    emb = torch.randn(64, 7, 4)
    out = drop_condition(emb, torch.zeros(7, 4), 0.5, torch.Generator().manual_seed(1))
    rows_null = (out == 0).all(dim=(1, 2))
    assert 0 < rows_null.sum() < 64
    assert torch.equal(out[~rows_null], emb[~rows_null])
    assert torch.equal(drop_condition(emb, torch.zeros(7, 4), 0.0), emb)
    assert (drop_condition(emb, torch.zeros(7, 4), 1.0) == 0).all()
    with pytest.raises(ValueError, match="p_uncond"):
        drop_condition(emb, 0.0, 1.5)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -1.0, torch.tensor([1.0, float("nan"), 2.0, 3.0])])
def test_cfg_refuses_a_nan_infinite_or_negative_scale(scale):
    model = ToyModel()
    x, t, c = _inputs()
    with pytest.raises(ValueError, match="guidance scale s must be a finite number >= 0"):
        cfg_eps(model, x, t, c, 5, scale)  # before: NaN (or inf) images, no error
    assert model.calls == []  # refused before the network runs


def test_cfg_per_sample_scale_must_have_one_entry_per_sample():
    x, t, c = _inputs()
    with pytest.raises(ValueError, match=r"per-sample guidance scale must have shape \(4,\)"):
        cfg_eps(ToyModel(), x, t, c, 5, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(TypeError, match="guidance scale"):
        cfg_eps(ToyModel(), x, t, c, 5, "3")
    # a one-element tensor is one scale for the whole batch
    torch.testing.assert_close(cfg_eps(ToyModel(), x, t, c, 5, torch.tensor([2.0])), cfg_eps(ToyModel(), x, t, c, 5, 2.0))


def test_a_fractional_null_class_is_refused_not_truncated():
    c = torch.arange(10)
    with pytest.raises(ValueError, match="null_cond must be a class index"):
        drop_condition(c, 9.5, 0.5)  # before: silently the class 9
    x, t, labels = _inputs()
    with pytest.raises(ValueError, match="null_cond must be a class index"):
        cfg_eps(ToyModel(), x, t, labels, 4.5, 2.0)
    assert torch.equal(drop_condition(c, 10.0, 1.0), torch.full_like(c, 10))  # a whole float is a class


def test_drop_condition_needs_a_batched_condition():
    with pytest.raises(ValueError, match=r"cond must be a batched tensor \(B, ...\)"):
        drop_condition(torch.tensor(3), 9, 0.5)  # before: IndexError from the shape
