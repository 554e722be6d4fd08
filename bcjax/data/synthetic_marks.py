"""The planted marks of synthetic sets (issue 16), a shortcut for testing whether a
model looks at the lesion: ``"calliper"`` (two '+' callipers joined by a dotted
line) or ``"text"`` (a block of annotation text), stamped into a corner.

Which images get a mark, and where, comes from a random generator of its own
(``_mark_for``), so that the images are the same with or without marks; how a
mark is drawn is ``stamp_mark``. Used by bcjax.data.synthetic, which writes the
sets and makes the control copy (``random_mark_copy``).
"""

from __future__ import annotations

import numpy as np

from bcjax.data.busi import CLASSES
from bcjax.data.synthetic_draw import GENERATOR_VERSION

MARKS = ("calliper", "text")
# How the marks are drawn, in a marked set's SYNTHETIC.json: a marked set cached
# with an older drawing is made again; unmarked sets (no "mark" entry) are untouched.
MARK_VERSION = 2  # 2: callipers 4x thicker, so that they survive a squash to 32 px
MARK_PLACEMENTS = ("malignant", "random")  # the shortcut, or the same mark unrelated to the class
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
_MALIGNANT = CLASSES.index("malignant")
_MARK_STREAM = 0x3A4C  # keys the marks' random numbers apart from the images'


# 3x5 dot-matrix glyphs of the annotation text ("2.4cm", "R 3").
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"),
    "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"),
    "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"),
    "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"),
    "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"),
    "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"),
    "c": ("000", "000", "111", "100", "111"),
    "m": ("000", "000", "111", "111", "101"),
    "L": ("100", "100", "100", "100", "111"),
    "R": ("110", "101", "110", "101", "101"),
    " ": ("000",) * 5,
}


def _mark_for(
    seed: int, label: int, number: int, mark: str, mark_prob: float, placement: str
) -> tuple[str, np.random.Generator] | None:
    """(corner, generator for the mark's shape) of image (label, number), or None: no mark.

    A generator of its own, keyed apart from the image's, so that the images
    are the same with or without marks, and the placement "random" draws anew.
    """
    if not mark or (placement == "malignant" and label != _MALIGNANT):
        return None
    rng = np.random.default_rng(
        [seed, label, number, GENERATOR_VERSION, _MARK_STREAM, MARK_PLACEMENTS.index(placement)]
    )
    if rng.random() >= mark_prob:
        return None
    return CORNERS[int(rng.integers(len(CORNERS)))], rng


def _fill(img: np.ndarray, y: int, x: int, height: int, width: int, value: int) -> None:
    """img[y:y+height, x:x+width] = value, clipped to the image."""
    img[max(0, y) : max(0, y + height), max(0, x) : max(0, x + width)] = value


def _origin(h: int, w: int, box_h: int, box_w: int, corner: str, margin: int) -> tuple[int, int]:
    y = margin if corner.startswith("top") else h - margin - box_h
    x = margin if corner.endswith("left") else w - margin - box_w
    return max(0, y), max(0, x)


def _draw_calliper(img: np.ndarray, corner: str, rng: np.random.Generator) -> None:
    """Two '+' callipers joined by a dotted line, as a sonographer's measurement."""
    h, w = img.shape
    # Sizes scale with the image, so the mark survives resizing: its lines, 4% of the
    # shorter side thick, stay over 1 px wide at 32 px. Thinner ones (1%, as scanners
    # draw them) blur away at the sizes a quick CPU run trains on, and a small model
    # ignored them even at 64 px, where they show (issue 16's planted-shortcut study).
    u = min(h, w) / 100
    arm, thick = max(2, round(8 * u)), max(1, round(4 * u))
    span = max(3 * arm, round(rng.uniform(26, 34) * u))
    drop = round(rng.uniform(0, 4) * u)  # the second calliper lower: a slanted measurement
    value = int(rng.integers(225, 256))
    y0, x0 = _origin(h, w, 2 * arm + 1 + drop, span + 2 * arm + 1, corner, max(1, round(6 * u)))
    ends = [(y0 + arm, x0 + arm), (y0 + arm + drop, x0 + arm + span)]
    for cy, cx in ends:
        _fill(img, cy - thick // 2, cx - arm, thick, 2 * arm + 1, value)
        _fill(img, cy - arm, cx - thick // 2, 2 * arm + 1, thick, value)
    (ay, ax), (by, bx) = ends
    dots = span // (2 * thick)
    for k in range(2, dots - 1):  # a gap next to each calliper
        t = k / dots
        _fill(
            img,
            round(ay + t * (by - ay)) - thick // 2,
            round(ax + t * (bx - ax)) - thick // 2,
            thick,
            thick,
            value,
        )


def _draw_text(img: np.ndarray, corner: str, rng: np.random.Generator) -> None:
    """Two lines of annotation text (a measurement and a side), in dot-matrix glyphs."""
    h, w = img.shape
    s = max(1, round(0.9 * min(h, w) / 100))  # glyph pixel size
    lines = [
        f"{rng.integers(1, 5)}.{rng.integers(0, 10)}cm",
        f"{'LR'[rng.integers(2)]} {rng.integers(1, 10)}",
    ]
    value = int(rng.integers(225, 256))
    char_w, line_h = 4 * s, 7 * s
    box_w, box_h = max(map(len, lines)) * char_w - s, len(lines) * line_h - 2 * s
    y0, x0 = _origin(h, w, box_h, box_w, corner, max(1, round(6 * min(h, w) / 100)))
    for i, line in enumerate(lines):
        for j, char in enumerate(line):
            for r, row in enumerate(_GLYPHS[char]):
                for c, bit in enumerate(row):
                    if bit == "1":
                        _fill(img, y0 + i * line_h + r * s, x0 + j * char_w + c * s, s, s, value)


def stamp_mark(img: np.ndarray, mark: str, corner: str, rng: np.random.Generator) -> None:
    """Draws ``mark`` ("calliper" | "text") into a corner of uint8 [H, W] ``img``, in place."""
    {"calliper": _draw_calliper, "text": _draw_text}[mark](img, corner, rng)


def _check_mark(mark: str, mark_prob: float, mark_placement: str) -> None:
    if mark not in ("",) + MARKS:
        raise ValueError(f"mark must be '' or one of {', '.join(MARKS)}, got {mark!r}")
    if not 0 <= mark_prob <= 1:
        raise ValueError(f"mark_prob must be in [0, 1], got {mark_prob}")
    if mark_placement not in MARK_PLACEMENTS:
        raise ValueError(
            f"mark_placement must be one of {', '.join(MARK_PLACEMENTS)}, got {mark_placement!r}"
        )
