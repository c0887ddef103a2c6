"""A deterministic checker of synthetic-world images, in the spirit of GenEval's detector checks.

The background is the median colour of the image's border; foreground pixels are those far from it;
objects are the connected foreground blobs (tiny specks ignored). Each prompt attribute is checked:

* colour: every object's mean colour is nearest (RGB distance, over the world's palette) to the
  prompt's colour;
* count: the number of objects equals the prompt's count;
* shape: every object's fill ratio (its area over its bounding box's) names the prompt's shape
  (square ~1, circle ~pi/4, triangle ~1/2);
* overall: all three (GenEval's strict per-prompt rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kelix.data.synthetic import COLORS

# fill ratio cut points, half way between the ideal shapes' ratios (1, pi/4, 1/2)
_SQUARE_ABOVE, _CIRCLE_ABOVE = (1 + np.pi / 4) / 2, (np.pi / 4 + 0.5) / 2


@dataclass
class Blob:
    area: int
    color: str  # nearest palette colour
    shape: str
    fill: float


def _palette() -> tuple[list[str], np.ndarray]:
    return list(COLORS), np.array(list(COLORS.values()), dtype=np.float64)


def nearest_color(rgb) -> str:
    names, values = _palette()
    return names[int(np.argmin(((values - np.asarray(rgb, dtype=np.float64)) ** 2).sum(-1)))]


def shape_of(fill: float) -> str:
    return "square" if fill > _SQUARE_ABOVE else "circle" if fill > _CIRCLE_ABOVE else "triangle"


def find_blobs(image, threshold: float = 60.0, min_area: float = 0.002) -> list[Blob]:
    """The objects of ``image`` (PIL or HxWx3 array): blobs of at least ``min_area`` of the image."""
    from scipy import ndimage

    x = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)
    border = np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]])
    background = np.median(border, axis=0)
    mask = np.sqrt(((x - background) ** 2).sum(-1)) > threshold
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    blobs = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        inside = labels[sl] == i
        area = int(inside.sum())
        if area < min_area * mask.size:
            continue
        fill = area / inside.size
        blobs.append(Blob(area, nearest_color(x[sl][inside].mean(0)), shape_of(fill), fill))
    return blobs


def check_image(image, color: str, count: int, shape: str) -> dict[str, float]:
    """``{"color", "count", "shape", "overall"}`` (each 0 or 1) of ``image`` against the prompt's attributes."""
    blobs = find_blobs(image)
    ok_color = bool(blobs) and all(b.color == color for b in blobs)
    ok_shape = bool(blobs) and all(b.shape == shape for b in blobs)
    ok_count = len(blobs) == count
    return {"color": float(ok_color), "count": float(ok_count), "shape": float(ok_shape),
            "overall": float(ok_color and ok_count and ok_shape)}
