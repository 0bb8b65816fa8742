"""Sliders that survive headless runs: :func:`explore`.

In a live notebook (Jupyter or Colab) ``explore(fn, step=(0, 999, 1, 500), eta=[0.0, 0.5, 1.0])``
shows one control per argument and calls ``fn`` again whenever a control moves. In a headless run
(``DIFFUSION_HEADLESS=1``, as set by ``make test``/nbval and the book build; or no ipywidgets; or
no notebook kernel) it calls ``fn`` once with the defaults, so the same cell leaves a static figure
in the built book and in CI.

Controls are given per keyword argument as

* ``(min, max, step)`` or ``(min, max, step, default)``: a slider (integer when all are ints);
  without a default it starts in the middle, as ipywidgets does; min < max, step > 0 and a
  default in [min, max] on the grid min + k * step, else a ``ValueError`` naming the argument;
* a list: a dropdown of its items (the first is the default); items may be ``(label, value)``
  pairs; a dict maps labels to values;
* ``True``/``False``: a checkbox;
* an ipywidgets widget: used as it is (its ``value`` is the default);
* anything else: passed through unchanged (a fixed argument).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["explore", "is_headless", "defaults"]

_TRUE = {"1", "true", "yes", "on"}


def is_headless() -> bool:
    """True when controls cannot be used: ``DIFFUSION_HEADLESS``, no ipywidgets, or no kernel."""
    if os.environ.get("DIFFUSION_HEADLESS", "").strip().lower() in _TRUE:
        return True
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return True
    ip = get_ipython()
    return ip is None or getattr(ip, "kernel", None) is None


def _is_widget(spec: Any) -> bool:
    try:
        import ipywidgets
    except ImportError:
        return False
    return isinstance(spec, (ipywidgets.Widget, ipywidgets.fixed))


def _is_range(spec: Any) -> bool:
    return (isinstance(spec, tuple) and len(spec) in (3, 4)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec))


def _options(spec: Any) -> list[tuple[str, Any]]:
    """Dropdown options as (label, value) pairs."""
    if isinstance(spec, Mapping):
        return [(str(k), v) for k, v in spec.items()]
    out = []
    for item in spec:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append(item)
        else:
            out.append((str(item), item))
    return out


def _range_default(spec: tuple, name: str = "slider") -> int | float:
    """The value a slider ``(min, max, step[, default])`` starts at, as ipywidgets holds it (an int
    for an all-int spec, else a float), after checking the spec: finite numbers with min < max and
    step > 0, and a default in [min, max] on the grid min + k * step (a live slider only ever
    gives such values, so a headless run must not call ``fn`` with any other)."""
    lo, hi, step = spec[:3]
    where = f"slider {name}={spec!r}"
    if not all(math.isfinite(v) for v in spec):
        raise ValueError(f"{where}: (min, max, step[, default]) must be finite numbers")
    if not lo < hi:
        raise ValueError(f"{where}: min ({lo}) must be smaller than max ({hi})")
    if not step > 0:
        raise ValueError(f"{where}: step must be positive, got {step}")
    if len(spec) == 4:
        value = spec[3]
        if not lo <= value <= hi:
            raise ValueError(f"{where}: the default {value} lies outside [{lo}, {hi}]")
        k = (value - lo) / step
        if abs(k - round(k)) > 1e-9 * max(1.0, abs(k)):
            raise ValueError(f"{where}: the default {value} is not on the slider's grid {lo} + k * {step} "
                             f"(the nearest are {lo + math.floor(k) * step:g} and {lo + math.ceil(k) * step:g})")
    else:  # the middle of the range, on the grid
        value = lo + round((hi - lo) / 2 / step) * step
        if not isinstance(value, int):
            value = round(value, 12)  # 0.30000000000000004 -> 0.3: the grid value, without float noise
    if all(isinstance(v, int) for v in spec):
        return int(value)
    return float(value)


def _default(spec: Any, name: str = "slider") -> Any:
    if _is_widget(spec):
        return spec.value
    if _is_range(spec):
        return _range_default(spec, name)
    if isinstance(spec, (list, Mapping)) and len(spec) > 0:
        return _options(spec)[0][1]
    return spec


def defaults(**sliders: Any) -> dict[str, Any]:
    """The values :func:`explore` passes to ``fn`` in a headless run: exactly those a live
    notebook's controls start at. A malformed slider spec is a ``ValueError`` naming it."""
    return {name: _default(spec, name) for name, spec in sliders.items()}


def _control(name: str, spec: Any) -> Any:
    import ipywidgets as w

    if _is_widget(spec):
        return spec
    style = {"description_width": "initial"}
    layout = w.Layout(width="420px")
    if _is_range(spec):
        lo, hi, step = spec[:3]
        kind = w.IntSlider if all(isinstance(v, int) for v in spec) else w.FloatSlider
        return kind(min=lo, max=hi, step=step, value=_range_default(spec, name), description=name,
                    continuous_update=False, style=style, layout=layout)
    if isinstance(spec, bool):
        return w.Checkbox(value=spec, description=name)
    if isinstance(spec, (list, Mapping)) and len(spec) > 0:
        options = _options(spec)
        return w.Dropdown(options=options, value=options[0][1], description=name, style=style)
    return w.fixed(spec)


def _showing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose returned figure is drawn once and closed (not also by pyplot's inline flush)."""

    def call(**values: Any) -> Any:
        result = fn(**values)
        if result is None:
            return None
        from matplotlib.figure import Figure

        if isinstance(result, Figure):
            from .viz import show

            show(result)
            return None
        return result

    return call


def _describe(values: Mapping[str, Any]) -> str:
    def short(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else repr(v)
        return text if len(text) <= 24 else text[:21] + "..."

    return ", ".join(f"{k}={short(v)}" for k, v in values.items())


def explore(fn: Callable[..., Any], caption: bool = True, **sliders: Any) -> None:
    """Call ``fn(**values)`` under controls in a live notebook, or once at the defaults headless.

    A value that ``fn`` returns (a figure, say) is displayed, as ipywidgets' ``interact`` does.
    Headless, ipywidgets is not needed and every spec has a default, the very value the live
    control starts at. A malformed slider (min >= max, step <= 0, a default outside the range or
    off the step grid, NaN) is a ``ValueError`` naming the argument, live or headless, before
    ``fn`` runs; an error inside ``fn`` propagates too, so a broken figure fails its cell in CI.
    ``caption`` prints one line saying which values the static figure shows.
    """
    values = defaults(**sliders)  # checks every slider spec, live or headless
    if not is_headless():
        try:
            _explore_live(fn, sliders)
            return
        except Exception as exc:  # a frontend without widget support: fall back to the static figure
            print(f"(interactive controls unavailable: {exc}; showing the defaults)")
    if caption and values:
        print(f"Shown at {_describe(values)}; in a live notebook, sliders change them.")
    result = _showing(fn)(**values)
    if result is not None:
        try:
            from IPython.display import display
        except ImportError:
            return
        display(result)


def _explore_live(fn: Callable[..., Any], sliders: Mapping[str, Any]) -> None:
    import ipywidgets as w

    from .profiles import in_colab

    if in_colab():  # Colab draws ipywidgets 8 only through its custom widget manager
        from google.colab import output

        output.enable_custom_widget_manager()
    controls = {name: _control(name, spec) for name, spec in sliders.items()}
    from IPython.display import display

    display(w.interactive(_showing(fn), **controls))
