"""The book's shared plots: image grids, 2-D trajectories, noise schedules, denoising strips.

Every chapter draws with these, so a picture of samples looks the same in every chapter.

Conventions (the book's notation table): images are ``(B, C, H, W)`` in ``[-1, 1]`` (torch tensors
or NumPy arrays), ``C`` is 1 (grey, drawn with ``cmap``) or 3 (RGB); ``t`` runs from 0 to T-1.

How figures behave:

* A function called without ``ax`` builds a new :class:`~matplotlib.figure.Figure` that pyplot does
  not track and returns it. Put it last in a notebook cell (it is drawn once), or call :func:`show`
  to draw it at once anywhere in a cell. Nothing is left open, so headless runs (nbval, the book
  build, a script on the Agg backend) never pile up figures.
* Called with ``ax`` (an Axes you made, e.g. with ``plt.subplots``), it draws into that Axes and
  returns its figure; that figure belongs to you.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "to_numpy_images",
    "make_grid",
    "image_grid",
    "show",
    "show_images",
    "plot_trajectories_2d",
    "plot_schedules",
    "log_snr",
    "denoising_strip",
]

ArrayLike = Any  # a torch.Tensor, a NumPy array, or a list of either


def _in_ipython_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def _register_figure_display() -> None:
    """In a notebook, make a Figure shown as a cell's result draw as a PNG.

    pyplot's inline backend registers this only once it is loaded (at the first ``plt.figure``);
    the figures here do not go through pyplot, so register it unless something else already has.
    """
    if not _in_ipython_kernel():
        return
    from IPython import get_ipython
    from IPython.core.pylabtools import select_figure_formats

    ip = get_ipython()
    try:
        ip.display_formatter.formatters["image/png"].lookup_by_type(Figure)
    except KeyError:
        select_figure_formats(ip, {"png"})


def _numpy(x: ArrayLike) -> np.ndarray:
    """A float64 NumPy copy of a tensor or array (detached, on the CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def to_numpy_images(images: ArrayLike | Sequence[ArrayLike]) -> np.ndarray:
    """Images as a ``(B, C, H, W)`` float array in ``[-1, 1]`` (values outside are clipped).

    Accepts a ``(B, C, H, W)`` batch, a single ``(C, H, W)`` or ``(H, W)`` image, or a list of
    ``(C, H, W)`` / ``(H, W)`` images of one size.
    """
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError("no images to draw: the list is empty")
        arr = np.concatenate([to_numpy_images(im) for im in images])
    else:
        arr = _numpy(images)
        if arr.ndim == 2:
            arr = arr[None, None]
        elif arr.ndim == 3:
            arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), (C, H, W) or (H, W); got shape {arr.shape}")
    if arr.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels in dimension 1 (B, C, H, W); got shape {arr.shape}")
    return np.clip(np.nan_to_num(arr), -1.0, 1.0)


def make_grid(images: ArrayLike | Sequence[ArrayLike], nrow: int | None = None, pad: int = 1,
              pad_value: float = 1.0) -> np.ndarray:
    """Tile images into one ``(H', W', C)`` array in ``[0, 1]``, ``nrow`` images per row.

    ``nrow=None`` makes the grid as square as it can be. Tiles are separated by ``pad`` pixels of
    ``pad_value`` (in ``[0, 1]``; 1 is white).
    """
    arr = (to_numpy_images(images) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    b, c, h, w = arr.shape
    ncol = nrow if nrow is not None else math.ceil(math.sqrt(b))
    ncol = max(1, min(int(ncol), b))
    nrows = math.ceil(b / ncol)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.float64)
    for i in range(b):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = arr[i].transpose(1, 2, 0)
    return grid


def _new_axes(figsize: tuple[float, float], ncols: int = 1) -> tuple[Figure, list[Axes]]:
    _register_figure_display()
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _figsize_for(shape: tuple[int, int], width: float = 6.0, max_height: float = 8.0) -> tuple[float, float]:
    h, w = shape
    fig_w = min(width, max(2.0, w / 16))
    fig_h = min(max_height, max(1.2, fig_w * h / w + 0.4))
    return fig_w, fig_h


def _imshow(ax: Axes, grid: np.ndarray, cmap: str) -> None:
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def image_grid(images: ArrayLike | Sequence[ArrayLike], nrow: int | None = None, title: str | None = None,
               ax: Axes | None = None, cmap: str = "gray") -> Figure:
    """Draw a batch of images ``(B, C, H, W)`` in ``[-1, 1]`` (or a list of images) as one grid.

    ``nrow`` is the number of images per row (as in torchvision); ``None`` makes it square.
    Returns the figure (new and untracked by pyplot when ``ax`` is None, see the module docstring).
    """
    grid = make_grid(images, nrow=nrow)
    if ax is None:
        fig, (ax,) = _new_axes(_figsize_for(grid.shape[:2]))
    _imshow(ax, grid, cmap)
    if title:
        ax.set_title(title)
    return ax.figure


def show(fig: Figure) -> None:
    """Draw ``fig`` now and close it: in a notebook it is displayed in place.

    Outside a notebook (a script, a test) it is only closed; save it with ``fig.savefig`` first.
    """
    if _in_ipython_kernel():
        from IPython.display import display

        display(fig)
    plt.close(fig)  # a no-op for the untracked figures made here; frees one made with pyplot


def show_images(images: ArrayLike | Sequence[ArrayLike], nrow: int | None = None, title: str | None = None,
                cmap: str = "gray") -> None:
    """:func:`image_grid` drawn at once (see :func:`show`); returns nothing, so never draws twice."""
    show(image_grid(images, nrow=nrow, title=title, cmap=cmap))


def plot_trajectories_2d(traj: ArrayLike, data: ArrayLike | None = None, ax: Axes | None = None,
                         max_paths: int = 64, title: str | None = None, lim: float | None = None) -> Figure:
    """Paths of 2-D points through the sampling process.

    ``traj`` is ``(T, N, 2)``: ``T`` steps (first = start, e.g. pure noise; last = the sample) of
    ``N`` points. At most ``max_paths`` paths are drawn as lines, coloured from the start (light)
    to the end (dark); all starts and ends are drawn as points. ``data`` ``(M, 2)``, if given, is
    drawn underneath in grey for comparison. ``lim`` fixes both axes to ``[-lim, lim]``.
    """
    arr = _numpy(traj)
    if arr.ndim != 3 or arr.shape[-1] != 2:
        raise ValueError(f"traj must be (T, N, 2); got shape {arr.shape}")
    if ax is None:
        fig, (ax,) = _new_axes((4.5, 4.5))
    if data is not None:
        ref = _numpy(data).reshape(-1, 2)
        ax.scatter(ref[:, 0], ref[:, 1], s=4, c="0.75", label="data", zorder=0)
    n_steps, n = arr.shape[:2]
    cmap = matplotlib.colormaps["viridis"]
    for i in range(min(n, max_paths)):
        ax.plot(arr[:, i, 0], arr[:, i, 1], lw=0.7, alpha=0.5, color=cmap(0.35), zorder=1)
    ax.scatter(arr[0, :, 0], arr[0, :, 1], s=6, color=cmap(0.9), label="start (t = T-1)", zorder=2)
    ax.scatter(arr[-1, :, 0], arr[-1, :, 1], s=6, color=cmap(0.0), label="end (t = 0)", zorder=3)
    if lim is not None:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize="small", markerscale=2)
    if title:
        ax.set_title(title)
    return ax.figure


def log_snr(alpha_bar: ArrayLike) -> np.ndarray:
    """``log(alpha_bar / (1 - alpha_bar))``, the log signal-to-noise ratio at each ``t``."""
    ab = np.clip(_numpy(alpha_bar), 1e-20, 1 - 1e-12)
    return np.log(ab) - np.log1p(-ab)


def plot_schedules(schedules: Mapping[str, ArrayLike], axes: Sequence[Axes] | None = None,
                   title: str | None = None) -> Figure:
    """Compare noise schedules: ``alpha_bar`` and the log-SNR against ``t``.

    ``schedules`` maps a name to its ``alpha_bar`` (length ``T``), e.g.
    ``{"linear": alpha_bar_linear, "cosine": alpha_bar_cosine}``. When the lengths differ, the
    horizontal axis is ``t / (T - 1)`` so the schedules line up. ``axes`` is a pair of Axes to draw
    into; if None a new two-panel figure is made.
    """
    if not schedules:
        raise ValueError("no schedules to plot")
    curves = {name: _numpy(ab).reshape(-1) for name, ab in schedules.items()}
    same_length = len({len(v) for v in curves.values()}) == 1
    if axes is None:
        fig, axes = _new_axes((9.0, 3.4), ncols=2)
    ax_ab, ax_snr = axes
    for name, ab in curves.items():
        t = np.arange(len(ab), dtype=np.float64)
        x = t if same_length else t / max(len(ab) - 1, 1)
        ax_ab.plot(x, ab, label=name)
        ax_snr.plot(x, log_snr(ab), label=name)
    xlabel = "t" if same_length else "t / (T - 1)"
    ax_ab.set(xlabel=xlabel, ylabel=r"$\bar\alpha_t$", title=r"signal kept: $\bar\alpha_t$", ylim=(-0.02, 1.02))
    ax_snr.set(xlabel=xlabel, ylabel=r"$\log(\bar\alpha_t / (1 - \bar\alpha_t))$", title="log-SNR")
    for ax in (ax_ab, ax_snr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig = ax_ab.figure
    if title:
        fig.suptitle(title)
    return fig


def denoising_strip(images: ArrayLike | Sequence[ArrayLike], ts: Sequence[int] | ArrayLike,
                    title: str | None = None, ax: Axes | None = None, cmap: str = "gray") -> Figure:
    """Snapshots of denoising, left to right, each labelled with its ``t``.

    ``images`` is ``(K, C, H, W)`` (one sample at ``K`` times, or a list of ``K`` images) or
    ``(K, B, C, H, W)`` (``B`` samples, one per row). ``ts`` holds the ``K`` timesteps.
    """
    if not isinstance(images, (list, tuple)) and _numpy(images).ndim == 5:
        arr = _numpy(images)  # (K, B, C, H, W) -> rows of samples, columns of times
        k, b = arr.shape[:2]
        batch = arr.transpose(1, 0, 2, 3, 4).reshape(k * b, *arr.shape[2:])
    else:
        batch = to_numpy_images(images)
        k, b = batch.shape[0], 1
    ts = [int(t) for t in _numpy(ts).reshape(-1)]
    if len(ts) != k:
        raise ValueError(f"got {k} snapshots but {len(ts)} timesteps")
    grid = make_grid(batch, nrow=k)
    if ax is None:
        fig, (ax,) = _new_axes((min(12.0, 1.3 * k + 0.5), min(8.0, 1.3 * b + 0.7)))
    _imshow(ax, grid, cmap)
    h, w = batch.shape[2:]
    ax.set_xticks([1 + i * (w + 1) + w / 2 for i in range(k)], [f"t={t}" for t in ts], fontsize="small")
    ax.tick_params(length=0)
    if title:
        ax.set_title(title)
    return ax.figure
