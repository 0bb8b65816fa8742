"""Sliders that survive headless runs: :func:`explore`.

In a live notebook (Jupyter or Colab) ``explore(fn, step=(0, 999, 1, 500), eta=[0.0, 0.5, 1.0])``
shows one control per argument and calls ``fn`` again whenever a control moves. In a headless run
(``DIFFUSION_HEADLESS=1``, as set by ``make test``/nbval and the book build; or no ipywidgets; or
no notebook kernel) it calls ``fn`` once with the defaults, so the same cell leaves a static figure
in the built book and in CI.

Controls are given per keyword argument as

* ``(min, max, step)`` or ``(min, max, step, default)``: a slider (integer when all are ints);
  without a default it starts in the middle, as ipywidgets does;
* a list: a dropdown of its items (the first is the default); items may be ``(label, value)``
  pairs; a dict maps labels to values;
* ``True``/``False``: a checkbox;
* an ipywidgets widget: used as it is (its ``value`` is the default);
* anything else: passed through unchanged (a fixed argument).
"""

from __future__ import annotations

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


def _range_default(spec: tuple) -> int | float:
    lo, hi, step = spec[:3]
    if len(spec) == 4:
        value = spec[3]
    elif step:
        value = lo + round((hi - lo) / 2 / step) * step
    else:
        value = (lo + hi) / 2
    if all(isinstance(v, int) for v in spec):
        return int(value)
    return float(value)


def _default(spec: Any) -> Any:
    if _is_widget(spec):
        return spec.value
    if _is_range(spec):
        return _range_default(spec)
    if isinstance(spec, (list, Mapping)) and len(spec) > 0:
        return _options(spec)[0][1]
    return spec


def defaults(**sliders: Any) -> dict[str, Any]:
    """The values :func:`explore` passes to ``fn`` in a headless run."""
    return {name: _default(spec) for name, spec in sliders.items()}


def _control(name: str, spec: Any) -> Any:
    import ipywidgets as w

    if _is_widget(spec):
        return spec
    style = {"description_width": "initial"}
    layout = w.Layout(width="420px")
    if _is_range(spec):
        lo, hi, step = spec[:3]
        kind = w.IntSlider if all(isinstance(v, int) for v in spec) else w.FloatSlider
        return kind(min=lo, max=hi, step=step, value=_range_default(spec), description=name,
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
    Headless, the controls themselves can never make this raise: ipywidgets is not needed and
    every spec has a default. An error inside ``fn`` does propagate, so a broken figure fails its
    cell in CI. ``caption`` prints one line saying which values the static figure shows.
    """
    if not is_headless():
        try:
            _explore_live(fn, sliders)
            return
        except Exception as exc:  # a frontend without widget support: fall back to the static figure
            print(f"(interactive controls unavailable: {exc}; showing the defaults)")
    values = defaults(**sliders)
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
