"""Drawing and printing bcjax.predict's results: one Grad-CAM overlay PNG per image
(image left, heat map overlaid right; ``save_overlay`` with its file name and title
helpers) and the aligned text table the command line prints (``format_table``).

Used by ``bcjax.predict``'s ``predict_files`` and ``main``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from bcjax.data import busi


def unique_names(files: Sequence[pathlib.Path]) -> list[str]:
    """``<stem>_gradcam.png``, numbered when two images share a stem."""
    seen: dict[str, int] = {}
    out = []
    for f in files:
        stem = pathlib.Path(f).stem
        seen[stem] = seen.get(stem, 0) + 1
        out.append(f"{stem}_gradcam.png" if seen[stem] == 1 else f"{stem}_{seen[stem]}_gradcam.png")
    return out


def display_image(path, fallback: np.ndarray) -> np.ndarray:
    # The original resolution reads better than the model's S x S copy.
    try:
        return busi.read_image(path)
    except busi.BusiError:
        return fallback


def title(path, probs, target: int, names) -> str:
    k = int(np.argmax(probs))
    title = f"{pathlib.Path(path).name}\npredicted {names[k]} ({probs[k]:.1%})"
    if target != k:
        title += f", Grad-CAM of {names[target]} ({probs[target]:.1%})"
    return title


def save_overlay(
    path, image: np.ndarray, cam: np.ndarray, *, title: str = "", alpha: float = 0.45
) -> None:
    """PNG: ``image`` left, ``image`` with ``cam`` ([h, w] in [0, 1], resized to it) right."""
    # Figure + Agg canvas, not pyplot: no global backend or figure registry (as bcjax.eval.plots).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    fig = Figure(figsize=(9, 4.6))
    FigureCanvasAgg(fig)
    # Fixed axes, not a layout engine: equal panels, and 40% less time per figure.
    left = fig.add_axes((0.02, 0.03, 0.44, 0.8))
    right = fig.add_axes((0.48, 0.03, 0.44, 0.8))
    colorbar_axes = fig.add_axes((0.935, 0.13, 0.015, 0.6))
    left.imshow(image)
    right.imshow(image)
    # Stretched to the image's own pixels here: matplotlib's interpolation of a
    # coarser map over an extent smears colour along the edges.
    cam = Image.fromarray(np.asarray(cam, np.float32)).resize((width, height), Image.BILINEAR)
    shown = right.imshow(
        np.clip(np.asarray(cam), 0.0, 1.0),
        cmap="jet",
        alpha=alpha,
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    for ax in (left, right):
        ax.set_axis_off()
    fig.colorbar(shown, cax=colorbar_axes)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)


def format_table(rows: Sequence[dict]) -> str:
    """The rows as an aligned text table."""
    if not rows:
        return "(no images)"
    fields = list(rows[0])
    cells = [
        [f"{r[k]:.4f}" if isinstance(r[k], float) else str(r[k]) for k in fields] for r in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(fields)]
    line = lambda values: "  ".join(
        v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
    )
    return "\n".join([line(fields), line(["-" * w for w in widths]), *map(line, cells)])
