"""T2I-Adapter: parity with diffusers' ``T2IAdapter`` and ``MultiAdapter`` (max relative error <= 1e-5
per feature, every parameter perturbed), the shapes it promises, and the errors for bad input."""

import pytest
import torch
from parity_utils import perturb, rel_error

diffusers = pytest.importorskip("diffusers")

from diffusion_core import interop  # noqa: E402
from diffusion_core.interop import from_diffusers  # noqa: E402
from diffusion_core.models.t2i_adapter import MultiAdapter, T2IAdapter, T2IAdapterConfig  # noqa: E402

TOL = 1e-5


CONFIGS = [
    # full adapters with 1, 3 and 5 input channels, various widths, depths and unshuffle factors
    dict(in_channels=1, channels=[8, 16], num_res_blocks=1, downscale_factor=2, adapter_type="full_adapter"),
    dict(in_channels=3, channels=[8, 16, 16, 24], num_res_blocks=2, downscale_factor=1, adapter_type="full_adapter"),
    dict(in_channels=5, channels=[12], num_res_blocks=3, downscale_factor=4, adapter_type="full_adapter"),
    # light adapters: one more level than channels, quarter-width insides
    dict(in_channels=3, channels=[8, 16], num_res_blocks=2, downscale_factor=2, adapter_type="light_adapter"),
    dict(in_channels=1, channels=[4, 12, 8], num_res_blocks=1, downscale_factor=1, adapter_type="light_adapter"),
]


def _pair(i: int, cfg: dict | None = None):
    cfg = CONFIGS[i] if cfg is None else cfg
    torch.manual_seed(i)
    theirs = diffusers.T2IAdapter(**cfg).eval()
    perturb(theirs, 300 + i)
    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, T2IAdapter)
    return theirs, ours


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_adapter_matches_diffusers_feature_by_feature(i):
    theirs, ours = _pair(i)
    assert ours.total_downscale_factor == theirs.total_downscale_factor
    assert ours.downscale_factor == theirs.downscale_factor
    assert ours.config.to_diffusers_config() == {k: theirs.config[k] for k in CONFIGS[i]}
    m = ours.total_downscale_factor
    x = torch.randn(2, ours.config.in_channels, 2 * m, 3 * m, generator=torch.Generator().manual_seed(i))
    with torch.no_grad():
        a, b = theirs(x), ours(x)
    assert len(a) == len(b) == ours.num_levels
    assert [tuple(f.shape) for f in b] == ours.feature_shapes(2, 2 * m, 3 * m)
    for fa, fb in zip(a, b):
        assert fa.shape == fb.shape
        assert rel_error(fa, fb) <= TOL


def test_feature_shapes_follow_the_levels():
    full = T2IAdapter(T2IAdapterConfig(in_channels=1, channels=(8, 16, 16), num_res_blocks=1, downscale_factor=4))
    assert full.total_downscale_factor == 16 and full.num_levels == 3
    assert full.feature_shapes(1, 32, 48) == [(1, 8, 8, 12), (1, 16, 4, 6), (1, 16, 2, 3)]
    light = T2IAdapterConfig(channels=(8, 16), num_res_blocks=1, downscale_factor=2, adapter_type="light_adapter")
    assert light.num_levels == 3 and light.feature_channels == (8, 16, 16)
    assert light.feature_downscale_factors == (2, 4, 8) and light.total_downscale_factor == 8


def test_multi_adapter_matches_diffusers_with_different_input_channels():
    # features 8 x H/2, 16 x H/4, 16 x H/8 from all three (the light adapter repeats its last width)
    shared = dict(channels=[8, 16, 16], num_res_blocks=1, downscale_factor=2)
    cfgs = [dict(in_channels=1, adapter_type="full_adapter", **shared),
            dict(in_channels=3, adapter_type="full_adapter", **shared),
            dict(in_channels=4, adapter_type="light_adapter", channels=[8, 16], num_res_blocks=2, downscale_factor=2)]
    torch.manual_seed(0)
    theirs = diffusers.MultiAdapter([diffusers.T2IAdapter(**c) for c in cfgs]).eval()
    perturb(theirs, 400)
    ours = from_diffusers(theirs).eval()
    assert isinstance(ours, MultiAdapter) and ours.num_adapters == 3
    assert ours.total_downscale_factor == theirs.total_downscale_factor == 8
    g = torch.Generator().manual_seed(1)
    conds = [torch.randn(2, c["in_channels"], 16, 24, generator=g) for c in cfgs]
    with torch.no_grad():
        for weights in (None, [0.7, -0.2, 1.5], torch.tensor([0.7, -0.2, 1.5])):
            plain = weights.tolist() if isinstance(weights, torch.Tensor) else weights
            a, b = theirs(list(conds), plain), ours(conds, weights)
            assert len(a) == len(b) == 3
            for fa, fb in zip(a, b):
                assert fa.shape == fb.shape
                assert rel_error(fa, fb) <= TOL
        # the default weights are 1/K each: the mean of the adapters' features
        mean = [sum(f) / 3 for f in zip(*(ad(c) for ad, c in zip(ours.adapters, conds)))]
        for fa, fb in zip(mean, ours(conds)):
            torch.testing.assert_close(fa, fb)


def test_converters_are_registered():
    assert interop.DIFFUSERS["T2IAdapter"].endswith(":from_diffusers_t2i_adapter")
    assert interop.DIFFUSERS["MultiAdapter"].endswith(":from_diffusers_multi_adapter")


def test_full_adapter_xl_is_refused():
    with pytest.raises(ValueError, match="full_adapter_xl.*not implemented"):
        T2IAdapterConfig(adapter_type="full_adapter_xl")
    xl = diffusers.T2IAdapter(in_channels=1, channels=[8, 8, 16, 16], num_res_blocks=1, downscale_factor=2,
                              adapter_type="full_adapter_xl")
    with pytest.raises(ValueError, match="full_adapter_xl.*not implemented"):
        from_diffusers(xl)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(channels=()), "channels"),
        (dict(channels=(8, 0)), "channels"),
        (dict(channels=8), "channels"),
        (dict(in_channels=0), "in_channels"),
        (dict(num_res_blocks=0), "num_res_blocks"),
        (dict(downscale_factor=-2), "downscale_factor"),
        (dict(adapter_type="huge_adapter"), "adapter_type"),
        (dict(channels=(8, 2), adapter_type="light_adapter"), "channels"),
    ],
)
def test_bad_config_values_are_named(kwargs, names):
    with pytest.raises(ValueError, match=names):
        T2IAdapterConfig(**kwargs)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return T2IAdapter(T2IAdapterConfig(in_channels=3, channels=(8, 16), num_res_blocks=1, downscale_factor=2))


def test_wrong_channel_count_is_named(small):
    with pytest.raises(ValueError, match=r"cond has 1 channels.*in_channels=3"):
        small(torch.zeros(1, 1, 8, 8))


def test_size_not_divisible_says_what_it_must_be(small):
    with pytest.raises(ValueError, match=r"cond has H x W = 8 x 6; both must be multiples of 4"):
        small(torch.zeros(1, 3, 8, 6))
    with pytest.raises(ValueError, match="multiples of 4"):
        small(torch.zeros(1, 3, 2, 8))  # divisible by the unshuffle factor only


def test_non_4d_input_is_named(small):
    with pytest.raises(ValueError, match=r"cond must be 4-D \(B, 3, H, W\)"):
        small(torch.zeros(3, 8, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_condition_is_named(small, bad):
    x = torch.zeros(1, 3, 8, 8)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="cond contains NaN or inf"):
        small(x)


def test_multi_adapter_errors(small):
    other = T2IAdapter(T2IAdapterConfig(in_channels=1, channels=(8, 16), num_res_blocks=2, downscale_factor=2))
    multi = MultiAdapter([small, other])
    conds = [torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8)]
    with pytest.raises(ValueError, match="got 1 conds for 2 adapters"):
        multi(conds[:1])
    with pytest.raises(ValueError, match="conds must be a list"):
        multi(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="got 3 adapter_weights for 2 adapters"):
        multi(conds, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="adapter_weights must be"):
        multi(conds, 1.0)
    with pytest.raises(ValueError, match=r"adapter_weights must be 1-D with 2 entries"):
        multi(conds, torch.ones(3))
    with pytest.raises(ValueError, match="adapter_weights must be finite"):
        multi(conds, [1.0, float("nan")])
    with pytest.raises(ValueError, match=r"conds\[1\] has 3 channels.*in_channels=1"):
        multi([conds[0], conds[0]])
    with pytest.raises(ValueError, match=r"conds\[1\] has batch and size"):
        multi([conds[0], torch.zeros(1, 1, 12, 8)])
    with pytest.raises(ValueError, match="at least one"):
        MultiAdapter([])
    for cfg in (dict(channels=(8, 24)), dict(channels=(8, 16, 16)), dict(channels=(8, 16), downscale_factor=4)):
        cfg = dict(in_channels=3, num_res_blocks=1, downscale_factor=2) | cfg
        with pytest.raises(ValueError, match=r"same shapes.*adapters\[1\]"):
            MultiAdapter([small, T2IAdapter(T2IAdapterConfig(**cfg))])


def test_state_dict_names_are_diffusers():
    theirs, ours = _pair(3)
    assert list(ours.state_dict()) == list(theirs.state_dict())
