"""Small real-looking pictures: a coloured shape on a textured, lit background; a class
folder of them (one class per colour), as people lay out their own evaluation data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 200), "green": (40, 160, 60)}
SHAPES = ("square", "circle", "triangle")


def photo(colour: str, shape: str, seed: int, size: int = 48) -> Image.Image:
    """A small real-looking picture: a coloured shape on a textured, lit background."""
    rng = np.random.default_rng(seed)
    ground = rng.integers(90, 200, 3)
    ramp = np.linspace(0.7, 1.2, size)[:, None, None] * ground
    pixels = np.clip(ramp + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    x, y, r = rng.integers(14, size - 14), rng.integers(14, size - 14), rng.integers(8, 13)
    fill = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + rng.normal(0, 15, 3), 0, 255))
    if shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return image


def write_class_folder(root: Path, per_class: int, seed: int = 7) -> list[str]:
    """root/<colour>_square/*.jpg: one class per colour (folder names with "_", as people name them)."""
    classes = []
    for c, colour in enumerate(COLOURS):
        name = f"{colour}_square"
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            photo(colour, "square", seed * 1000 + c * 100 + i).save(root / name / f"img_{i:03d}.jpg", quality=92)
        classes.append(name)
    return classes
