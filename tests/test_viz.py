"""The shared plots (diffusion_core.viz) and the headless behaviour of explore (diffusion_core.widgets)."""

from __future__ import annotations

import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from diffusion_core import viz, widgets


@pytest.fixture(autouse=True)
def no_figure_left_open():
    before = set(plt.get_fignums())
    yield
    assert set(plt.get_fignums()) == before, "a plot left a pyplot figure open"


def test_make_grid_maps_minus_one_to_black_and_one_to_white_with_padding():
    images = torch.stack([torch.full((1, 2, 3), -1.0), torch.full((1, 2, 3), 1.0)])  # (B, C, H, W)
    grid = viz.make_grid(images, nrow=2, pad=1, pad_value=0.5)
    assert grid.shape == (1 + 2 + 1, 1 + 3 + 1 + 3 + 1, 1)
    assert np.all(grid[1:3, 1:4] == 0.0) and np.all(grid[1:3, 5:8] == 1.0)
    assert grid[0, 0, 0] == 0.5


def test_make_grid_is_square_by_default_and_clips_out_of_range():
    grid = viz.make_grid(np.full((5, 3, 4, 4), 3.0), pad=0)
    assert grid.shape == (2 * 4, 3 * 4, 3)  # 5 images -> 3 per row, 2 rows
    assert grid[:4].max() == 1.0


def test_image_grid_accepts_tensors_arrays_and_lists_and_returns_an_untracked_figure():
    gray = torch.rand(6, 1, 8, 8) * 2 - 1
    for images in (gray, gray.numpy(), list(gray), [im[0] for im in gray], torch.rand(4, 3, 8, 8)):
        fig = viz.image_grid(images, nrow=3, title="samples")
        assert isinstance(fig, Figure)
        assert fig.axes[0].get_title() == "samples"
    assert plt.get_fignums() == []


def test_image_grid_draws_into_a_given_axes():
    fig, (a, b) = plt.subplots(1, 2)
    try:
        assert viz.image_grid(torch.zeros(2, 1, 4, 4), ax=b) is fig
        assert len(b.images) == 1 and len(a.images) == 0
    finally:
        plt.close(fig)


def test_image_grid_rejects_wrong_shapes_with_a_clear_message():
    with pytest.raises(ValueError, match="1 or 3 channels"):
        viz.image_grid(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="empty"):
        viz.image_grid([])


def test_show_images_and_show_close_their_figures():
    viz.show_images(torch.zeros(4, 1, 4, 4))
    fig, _ = plt.subplots()
    viz.show(fig)
    assert not plt.fignum_exists(fig.number)


def test_plot_trajectories_2d_draws_paths_starts_and_ends():
    traj = np.cumsum(np.random.default_rng(0).normal(size=(20, 100, 2)), axis=0)  # (T, N, 2)
    fig = viz.plot_trajectories_2d(torch.from_numpy(traj), data=np.zeros((10, 2)), max_paths=8, lim=4)
    ax = fig.axes[0]
    assert len(ax.lines) == 8
    assert len(ax.collections) == 3  # data, starts, ends
    assert ax.get_xlim() == (-4, 4)
    with pytest.raises(ValueError, match=r"\(T, N, 2\)"):
        viz.plot_trajectories_2d(np.zeros((20, 2)))


def test_plot_schedules_draws_alpha_bar_and_log_snr_panels():
    t = np.arange(1000)
    linear = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    cosine = np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2
    fig = viz.plot_schedules({"linear": torch.from_numpy(linear), "cosine": cosine}, title="schedules")
    ax_ab, ax_snr = fig.axes
    assert [line.get_label() for line in ax_ab.lines] == ["linear", "cosine"]
    np.testing.assert_allclose(ax_snr.lines[0].get_ydata(), np.log(linear / (1 - linear)))
    assert ax_ab.get_xlabel() == "t"
    fig = viz.plot_schedules({"T=1000": linear, "T=10": linear[::100]})
    assert fig.axes[0].get_xlabel() == "t / (T - 1)"


def test_log_snr_is_zero_where_signal_equals_noise():
    np.testing.assert_allclose(viz.log_snr(np.array([0.5, np.e / (1 + np.e)])), [0.0, 1.0], atol=1e-12)


def test_denoising_strip_labels_each_snapshot_with_its_t():
    ts = [999, 500, 100, 0]
    fig = viz.denoising_strip(torch.rand(4, 1, 8, 8) * 2 - 1, ts, title="denoising")
    labels = [tick.get_text() for tick in fig.axes[0].get_xticklabels()]
    assert labels == ["t=999", "t=500", "t=100", "t=0"]
    rows = viz.denoising_strip(np.zeros((4, 3, 1, 8, 8)), ts)  # (K, B, C, H, W): 3 rows
    assert rows.axes[0].images[0].get_array().shape[:2] == (3 * 9 + 1, 4 * 9 + 1)
    with pytest.raises(ValueError, match="timesteps"):
        viz.denoising_strip(torch.zeros(4, 1, 8, 8), [1, 2])


# ---- widgets.explore, headless ------------------------------------------------------------------

def test_explore_headless_calls_fn_once_with_the_defaults(monkeypatch, capsys):
    import ipywidgets

    monkeypatch.setenv("DIFFUSION_HEADLESS", "1")
    calls = []
    widgets.explore(lambda **kw: calls.append(kw),
                    step=(0, 999, 1, 250), scale=(0.0, 10.0, 0.5), n=(1, 9, 2), eta=[0.0, 0.5, 1.0],
                    schedule={"linear": "lin", "cosine": "cos"}, sampler=[("DDIM", "ddim"), ("DDPM", "ddpm")],
                    clip=True, width=ipywidgets.IntSlider(value=7), fixed_thing="x")
    assert calls == [{"step": 250, "scale": 5.0, "n": 5, "eta": 0.0, "schedule": "lin", "sampler": "ddim",
                      "clip": True, "width": 7, "fixed_thing": "x"}]
    assert isinstance(calls[0]["step"], int) and isinstance(calls[0]["scale"], float)
    assert "step=250" in capsys.readouterr().out


def test_explore_headless_shows_and_closes_a_returned_figure(monkeypatch):
    monkeypatch.setenv("DIFFUSION_HEADLESS", "1")

    def draw(k):
        fig, ax = plt.subplots()
        ax.plot(range(k))
        return fig

    assert widgets.explore(draw, k=(1, 5, 1)) is None


def test_explore_without_ipywidgets_or_kernel_is_headless_and_never_raises(monkeypatch):
    monkeypatch.delenv("DIFFUSION_HEADLESS", raising=False)
    assert widgets.is_headless()  # no notebook kernel in pytest
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # and no ipywidgets at all
    seen = []
    widgets.explore(lambda a, b: seen.append((a, b)), caption=False, a=(0, 4, 1), b=["x", "y"])
    assert seen == [(2, "x")]


def test_defaults_match_ipywidgets_slider_starting_values():
    import ipywidgets

    spec = (0.0, 1.0, 0.1)
    slider = ipywidgets.interactive(lambda v: None, v=spec).children[0]
    assert widgets.defaults(v=spec)["v"] == pytest.approx(slider.value)


@pytest.mark.parametrize("spec, words", [
    ((0.0, 10.0, 0.5, 12.0), "outside"),          # before: fn(s=12.0), a value no slider gives
    ((0, 10, 3, 5), "not on the slider's grid"),  # before: fn(s=5); the slider moves 0, 3, 6, 9
    ((5, 1, 1), "smaller than max"),
    ((0.0, 1.0, 0.0), "step must be positive"),
    ((0.0, 1.0, -0.1), "step must be positive"),
    ((0.0, float("nan"), 0.1), "finite"),
])
def test_bad_slider_specs_are_errors_naming_the_argument(monkeypatch, spec, words):
    monkeypatch.setenv("DIFFUSION_HEADLESS", "1")
    calls = []
    with pytest.raises(ValueError, match=f"slider s=.*{words}"):
        widgets.explore(lambda s: calls.append(s), caption=False, s=spec)
    assert calls == []
    with pytest.raises(ValueError, match=words):
        widgets.defaults(s=spec)


def test_headless_defaults_are_exactly_the_live_sliders_starting_values():
    for spec in [(0.1, 0.7, 0.2), (0.0, 1.0, 0.1), (0, 10, 3), (0.0, 0.05, 0.002, 0.008), (0, 999, 1, 200),
                 (0.1, 0.7, 0.2, 0.7), (1, 2, 5)]:
        live = widgets._control("v", spec).value
        headless = widgets.defaults(v=spec)["v"]
        assert headless == live and type(headless) is type(live), spec
        lo, _, step = spec[:3]
        assert abs((headless - lo) / step - round((headless - lo) / step)) < 1e-9, spec  # on the grid
    assert widgets.defaults(v=(0.1, 0.7, 0.2))["v"] == 0.3  # not 0.30000000000000004
    assert widgets._control("v", (0.0, 2.0, 0.5, 1.5)).value == 1.5
