"""Pictures of states: the matplotlib plumbing behind `render_mode="rgb_array"` and the run report.

Each problem draws its own states (`Problem.draw(state, fig)`, beside its verifier); this module only makes
the figure, calls it and turns the result into what a caller wants: an RGB array (Gymnasium's `rgb_array`)
or PNG bytes (the report). matplotlib is imported on first use, so `import discover_envs` stays light, and only
its object API is used (no pyplot): figures are never registered globally, so nothing leaks between calls.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from discover_envs.problem import Problem

__all__ = ["figure_png", "figure_rgb", "new_figure", "state_figure", "state_image", "state_png", "text_card"]

#: Resolution of every picture (pixels = inches x DPI); `Problem.draw_size` gives the inches.
DPI = 100


def new_figure(size: tuple[float, float]) -> Figure:
    """A figure with an Agg canvas of `size` inches, outside pyplot's registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_rgb(fig: Figure) -> np.ndarray:
    """The figure as an H x W x 3 uint8 array (what Gymnasium's `rgb_array` mode returns)."""
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[:, :, :3])  # type: ignore[attr-defined]  # Agg


def figure_png(fig: Figure, dpi: float = DPI) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def state_figure(problem: Problem, state: dict[str, Any], scale: float = 1.0) -> Figure:
    """A figure of `state` drawn by its problem, `scale` times the problem's `draw_size`."""
    width, height = problem.draw_size
    fig = new_figure((width * scale, height * scale))
    problem.draw(state, fig)
    return fig


def state_image(problem: Problem, state: dict[str, Any]) -> np.ndarray:
    """`state` drawn by its problem, as an RGB uint8 array."""
    return figure_rgb(state_figure(problem, state))


def state_png(problem: Problem, state: dict[str, Any], scale: float = 1.0) -> bytes:
    """`state` drawn by its problem, as PNG bytes (`scale` < 1 for thumbnails)."""
    return figure_png(state_figure(problem, state, scale))


def text_card(fig: Figure, title: str, lines: list[str], code: str | None = None, max_code_lines: int = 24) -> None:
    """A state without a picture of its own: a title, a few lines of figures and the head of its code."""
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title, fontsize=11, loc="left")
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", fontsize=10, transform=ax.transAxes)
    if code:
        shown = code.rstrip().splitlines()
        more = len(shown) - max_code_lines
        text = "\n".join(line[:100] for line in shown[:max_code_lines])
        text += f"\n... ({more} more lines)" if more > 0 else ""
        y = 0.95 - 0.07 * len(lines)
        ax.text(0.0, y, text, va="top", ha="left", fontsize=7, family="monospace", transform=ax.transAxes)
