"""The automatic judge's eyes: read a picture of the shapes world (data/shapes.py) back into its scene.

The pictures are procedural: solid palette colours (each object's jittered by at most 20 per channel), four
shapes, two sizes, a noisy dark background, objects at least a pixel apart. So a few rules recover the scene:

1. colour segmentation: each pixel takes the nearest of the palette colours and the background's mean colour;
2. connected components of each colour (4-neighbours): one per object. A component of fewer pixels than half the
   smallest shape (a small triangle, 2 * 3.5^2 ~ 24) is not an object: a decoder's blurred edge between a colour
   and the background passes through other palette colours (a VQ-VAE reconstruction's, a generated picture's);
3. size from the area: the largest small shape is a circle (pi 3.5^2 ~ 38 pixels), the smallest large one a
   triangle (2 * 6^2 = 72 pixels);
4. shape from the component's geometry (the fill is its area over its bounding box's):
   square    fills its bounding box;
   triangle  apex up: its centroid sits 1/6 of its height below the box's centre (diamonds, circles: 0);
   circle    fills pi/4 ~ 0.79 of the box, a diamond 1/2 (rasterised: circles >= 0.73, diamonds <= 0.63);
5. the centre from the centroid (a triangle's moved up by its r/3), and with it the relations.

`parse_scene` returns Objects like the generator's, so `is_true_of(caption, parse_scene(image))` judges a
picture by its caption and `same_scene` compares the parse with the generator's scene.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from torch import Tensor

from minimodels.data.shapes import COLOURS, SIZES, Object, relation

BACKGROUND = (30, 30, 30)  # the mean of the background noise (shapes.draw)
PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=float)  # (1 + C, 3); index 0 is the background
COLOUR_NAMES = (None, *COLOURS)
MIN_AREA = SIZES["small"] ** 2  # pixels: half a small triangle's; smaller components are not objects
LARGE_AREA = (math.pi * SIZES["small"] ** 2 + 2 * SIZES["large"] ** 2) / 2  # pixels: a larger component is large
SQUARE_FILL = 0.95  # a square fills its box (up to the odd pixel)
CIRCLE_FILL = 0.68  # between the diamonds' <= 0.63 and the circles' >= 0.73
TRIANGLE_DROP = 1 / 12  # centroid below the box's centre, over the height: triangles 1/6, the others 0


def segment(image: np.ndarray) -> np.ndarray:
    """image (3, H, W) uint8 -> (H, W) the index into PALETTE of each pixel's nearest colour (0: background)."""
    pixels = image.transpose(1, 2, 0).astype(float)  # (H, W, 3)
    return ((pixels[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)  # (H, W)


def components(labels: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    """The connected regions (4-neighbours) of equal non-background labels (H, W): [(label, [(y, x), ...]), ...],
    by flood fill, in the order of their first pixel (row by row)."""
    H, W = labels.shape
    seen = np.zeros_like(labels, dtype=bool)
    found = []
    for start in zip(*np.nonzero(labels)):
        if seen[start]:
            continue
        label, todo, region = labels[start], [start], []
        seen[start] = True
        while todo:
            y, x = todo.pop()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and not seen[ny, nx] and labels[ny, nx] == label:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        found.append((int(label), region))
    return found


def read_object(colour: str, region: list[tuple[int, int]]) -> Object:
    """One component's size, shape and centre (in pixels, as Object.cx / cy), by the rules of the module docstring."""
    ys, xs = (np.array(v) + 0.5 for v in zip(*region))  # pixel centres
    top, bottom, left, right = ys.min() - 0.5, ys.max() + 0.5, xs.min() - 0.5, xs.max() + 0.5  # the bounding box
    height = bottom - top
    fill = len(region) / (height * (right - left))
    size = "large" if len(region) > LARGE_AREA else "small"
    drop = (ys.mean() - (top + bottom) / 2) / height  # how far the centroid sits below the box's centre
    if fill >= SQUARE_FILL:
        shape = "square"
    elif drop >= TRIANGLE_DROP:
        shape = "triangle"
    else:
        shape = "circle" if fill >= CIRCLE_FILL else "diamond"
    cy = ys.mean() - (SIZES[size] / 3 if shape == "triangle" else 0)  # a triangle's centroid is r/3 below its centre
    return Object(colour, shape, size, float(xs.mean()), float(cy))


def parse_scene(image: Tensor | np.ndarray) -> tuple[Object, ...]:
    """image (3, H, W) uint8 -> the objects drawn in it, in the order of their first pixel (row by row)."""
    labels = segment(np.asarray(image))
    return tuple(read_object(COLOUR_NAMES[label], region) for label, region in components(labels) if len(region) >= MIN_AREA)


def same_scene(a: tuple[Object, ...], b: tuple[Object, ...]) -> bool:
    """Do a and b hold the same objects (colour, shape, size) standing in the same relations to each other?
    (The order of the objects does not matter, nor their exact centres.)"""
    def what(o: Object) -> tuple[str, str, str]:
        return o.colour, o.shape, o.size

    return len(a) == len(b) and any(
        all(what(x) == what(y) for x, y in zip(a, order))
        and all(relation(a[i], a[j]) == relation(order[i], order[j]) for i, j in itertools.permutations(range(len(a)), 2))
        for order in itertools.permutations(b))
