"""Procedural captioned scenes: the embedded default data set.

Every scene is a textured background with one to three flat shapes, and its
caption is a function of what is drawn (shape, colour, count, size, position,
background), so a model that reads the image can caption it and one that does
not cannot. Scenes are deterministic from (seed, split, index) and render at
any resolution. The "heldout" split draws single-object scenes from a
separate random stream; `ZERO_SHOT_TASKS` and `zero_shot_label` turn them into
classification tasks whose class names fit "this is a photo of a <name>".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
TEXTURES = ("plain", "striped", "dotted", "checkered")
SIZES = ("small", "large")
# 3x3 grid of positions: (name, column, row).
POSITIONS = (
    ("top left", 0, 0), ("top", 1, 0), ("top right", 2, 0),
    ("left", 0, 1), ("center", 1, 1), ("right", 2, 1),
    ("bottom left", 0, 2), ("bottom", 1, 2), ("bottom right", 2, 2),
)
SPLITS = {"train": 0, "heldout": 1}
COUNT_WORDS = {2: "two", 3: "three"}

# Radius as a fraction of the image side; a large shape still fits in its cell.
_RADIUS = {"small": 0.075, "large": 0.14}
_JITTER = 0.02
_TEXTURE_MIX = 0.45  # texture marks: background blended this much toward grey, never a palette colour

ZERO_SHOT_TASKS = {
    "shape": list(SHAPES),
    "object": [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES],
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str  # one of the POSITIONS names
    centre: tuple[float, float]  # (x, y) as fractions of the image side
    radius: float  # fraction of the image side


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: str
    texture: str
    caption: str

    def metadata(self) -> dict:
        """JSON-ready description, stored next to the image in shards."""
        meta = {
            "background": self.background,
            "texture": self.texture,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size, "position": o.position}
                for o in self.objects
            ],
        }
        if len(self.objects) == 1:
            meta["labels"] = {task: ZERO_SHOT_TASKS[task][zero_shot_label(self, task)] for task in ZERO_SHOT_TASKS}
        return meta


def make_scene(seed: int, index: int, split: str = "train") -> Scene:
    """Draw the scene description for example `index`; no pixels yet."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    colours = list(COLOURS)
    kind = "single" if split == "heldout" else rng.choice(["single", "single", "count", "pair"])
    if kind == "single":
        objects = (_draw_object(rng, colours, cell=int(rng.integers(9))),)
    elif kind == "count":
        count = int(rng.integers(2, 4))
        shape, colour, size = rng.choice(SHAPES), rng.choice(colours), rng.choice(SIZES)
        cells = rng.choice(9, size=count, replace=False)
        objects = tuple(_draw_object(rng, colours, int(c), shape, colour, size) for c in cells)
    else:
        left_col, right_col = sorted(rng.choice(3, size=2, replace=False))
        rows = rng.integers(3, size=2)
        first = _draw_object(rng, colours, int(rows[0] * 3 + left_col))
        second = _draw_object(rng, colours, int(rows[1] * 3 + right_col))
        while (second.shape, second.colour) == (first.shape, first.colour):
            second = _draw_object(rng, colours, int(rows[1] * 3 + right_col))
        objects = (first, second)
    used = {o.colour for o in objects}
    background = str(rng.choice([c for c in colours if c not in used]))
    texture = str(rng.choice(TEXTURES))
    return Scene(objects, background, texture, _caption(kind, objects, background, texture))


def render(scene: Scene, size: int) -> Image.Image:
    """Draw `scene` as an RGB image of side `size` (no anti-aliasing: shapes keep their exact palette colour)."""
    if size < 8:
        raise ValueError(f"image size must be >= 8 pixels, got {size}")
    image = Image.fromarray(_background(scene.background, scene.texture, size))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj, size)
    return image


def synthetic_example(seed: int, index: int, size: int, split: str = "train") -> tuple[Image.Image, str, dict]:
    """(image, caption, metadata) of example `index`."""
    scene = make_scene(seed, index, split)
    return render(scene, size), scene.caption, scene.metadata()


def zero_shot_label(scene: Scene, task: str) -> int:
    """Index into ZERO_SHOT_TASKS[task] of a single-object scene's class."""
    if task not in ZERO_SHOT_TASKS:
        raise ValueError(f"task must be one of {sorted(ZERO_SHOT_TASKS)}, got {task!r}")
    if len(scene.objects) != 1:
        raise ValueError("zero-shot labels exist only for single-object scenes; use split='heldout'")
    obj = scene.objects[0]
    name = obj.shape if task == "shape" else f"{obj.colour} {obj.shape}"
    return ZERO_SHOT_TASKS[task].index(name)


def _draw_object(rng, colours, cell, shape=None, colour=None, size=None) -> SceneObject:
    shape = str(shape or rng.choice(SHAPES))
    colour = str(colour or rng.choice(colours))
    size = str(size or rng.choice(SIZES))
    name, col, row = POSITIONS[cell]
    dx, dy = rng.uniform(-_JITTER, _JITTER, size=2)
    centre = ((col + 0.5) / 3 + dx, (row + 0.5) / 3 + dy)
    return SceneObject(shape, colour, size, name, centre, _RADIUS[size])


def _caption(kind: str, objects: tuple[SceneObject, ...], background: str, texture: str) -> str:
    ground = f"on a {texture} {background} background"
    first = objects[0]
    if kind == "single":
        return f"a {first.size} {first.colour} {first.shape} at the {first.position} {ground}"
    if kind == "count":
        count = COUNT_WORDS[len(objects)]
        return f"{count} {first.size} {first.colour} {first.shape}s {ground}"
    second = objects[1]
    return (
        f"a {first.size} {first.colour} {first.shape} to the left of "
        f"a {second.size} {second.colour} {second.shape} {ground}"
    )


def _background(colour: str, texture: str, size: int) -> np.ndarray:
    base = np.array(COLOURS[colour], dtype=np.uint8)
    shade = (base * (1 - _TEXTURE_MIX) + 128 * _TEXTURE_MIX).astype(np.uint8)
    period = max(4, size // 8)
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "plain":
        marks = np.zeros((size, size), dtype=bool)
    elif texture == "striped":
        marks = (yy // (period // 2)) % 2 == 1
    elif texture == "dotted":
        half = period // 2
        marks = ((yy % period - half) ** 2 + (xx % period - half) ** 2) <= max(1, period // 5) ** 2
    else:  # checkered
        marks = ((yy // period) + (xx // period)) % 2 == 1
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[:] = base
    out[marks] = shade
    return out


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject, size: int) -> None:
    cx, cy = obj.centre[0] * size, obj.centre[1] * size
    r = max(2.0, obj.radius * size)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif obj.shape == "square":
        s = r * 0.85
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        angles, radii = np.array([-90, 30, 150]), [r] * 3
    elif shape == "diamond":
        angles, radii = np.array([-90, 0, 90, 180]), [r] * 4
    elif shape == "hexagon":
        angles, radii = np.arange(6) * 60.0, [r] * 6
    else:  # star: five points alternating with inner corners
        angles, radii = -90 + np.arange(10) * 36.0, [r, r * 0.45] * 5
    rad = np.deg2rad(angles)
    return [(cx + ri * np.cos(a), cy + ri * np.sin(a)) for a, ri in zip(rad, radii)]
