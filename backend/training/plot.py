"""The evaluation report's picture: each model's mean IoU against the number of clicks, drawn as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

from backend.training.evaluation import CLICKS, CURVE_KEY, MAX_CLICKS

PLOT_INCHES = (8.0, 5.0)
PLOT_DPI = 100  # with PLOT_INCHES: 800 × 500 pixels


def iou_curves_png(models: Sequence[dict], title: str) -> bytes:
    """A PNG of the models' `miou_by_clicks` (as `ModelReport.as_dict` gives them), one line each."""
    # Imported here: only the workers that evaluate draw (matplotlib is in requirements.txt), and the web tier
    # (requirements-web.txt) imports nothing of it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI)
    canvas = FigureCanvasAgg(figure)  # Agg draws without a display and without pyplot's global state
    axes = figure.subplots()
    for model in models:
        curve = model[CURVE_KEY]
        if curve:
            axes.plot(list(CLICKS)[: len(curve)], curve, marker="o", markersize=3, label=model["model"])
    axes.set_xlim(1, MAX_CLICKS)
    axes.set_ylim(0.0, 1.0)
    axes.set_xticks(list(CLICKS))
    axes.set_xlabel("clicks")
    axes.set_ylabel("mean IoU")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.get_lines():
        axes.legend(loc="lower right", fontsize="small")
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()
