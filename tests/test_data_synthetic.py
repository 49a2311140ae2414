"""Synthetic scenes: deterministic, captions match pixels, zero-shot labels."""

import numpy as np
import pytest

from data.synthetic import (
    COLOURS, COUNT_WORDS, SHAPES, ZERO_SHOT_TASKS, make_scene, render, synthetic_example, zero_shot_label,
)


def test_same_seed_and_index_give_same_example_and_others_differ():
    a = synthetic_example(3, 11, 48)
    b = synthetic_example(3, 11, 48)
    assert a[1] == b[1] and a[2] == b[2]
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    others = {synthetic_example(seed, index, 48)[1] for seed, index in [(3, 12), (4, 11), (3, 13), (5, 0)]}
    assert len(others | {a[1]}) > 1
    assert make_scene(3, 11, "heldout") != make_scene(3, 11, "train")


@pytest.mark.parametrize("size", [17, 64, 200])
def test_any_resolution(size):
    image, caption, _ = synthetic_example(0, 5, size)
    assert image.size == (size, size) and image.mode == "RGB" and caption


def _dominant_palette_colour(pixels: np.ndarray, exclude: str) -> str:
    counts = {name: int(np.all(pixels == rgb, axis=-1).sum()) for name, rgb in COLOURS.items() if name != exclude}
    return max(counts, key=counts.get)


def test_caption_colour_is_the_colour_of_the_drawn_shape():
    for index in range(40):
        scene = make_scene(1, index, "heldout")
        pixels = np.asarray(render(scene, 64))
        (obj,) = scene.objects
        assert _dominant_palette_colour(pixels, exclude=scene.background) == obj.colour
        assert f"{obj.colour} {obj.shape}" in scene.caption
        assert f"{scene.texture} {scene.background} background" in scene.caption
        # the shape sits where the caption says: its pixels' centre is in the named third
        ys, xs = np.nonzero(np.all(pixels == COLOURS[obj.colour], axis=-1))
        column = "left" if xs.mean() < 64 / 3 else "right" if xs.mean() > 128 / 3 else None
        if column:
            assert column in obj.position


def test_caption_counts_and_lists_objects():
    kinds = set()
    for index in range(60):
        scene = make_scene(0, index)
        first = scene.objects[0]
        if len(scene.objects) in COUNT_WORDS and len({(o.shape, o.colour) for o in scene.objects}) == 1:
            kinds.add("count")
            assert scene.caption.startswith(f"{COUNT_WORDS[len(scene.objects)]} {first.size} {first.colour} {first.shape}s")
        elif len(scene.objects) == 2:
            kinds.add("pair")
            second = scene.objects[1]
            assert first.centre[0] < second.centre[0]
            assert f"{first.colour} {first.shape} to the left of a {second.size} {second.colour} {second.shape}" in scene.caption
        else:
            kinds.add("single")
    assert kinds == {"count", "pair", "single"}


def test_zero_shot_labels_on_heldout_scenes():
    assert ZERO_SHOT_TASKS["shape"] == list(SHAPES)
    seen = set()
    for index in range(30):
        scene = make_scene(0, index, "heldout")
        for task, names in ZERO_SHOT_TASKS.items():
            name = names[zero_shot_label(scene, task)]
            assert name in scene.caption
            assert scene.metadata()["labels"][task] == name
        seen.add(ZERO_SHOT_TASKS["shape"][zero_shot_label(scene, "shape")])
    assert len(seen) >= 4
    multi = next(make_scene(0, i) for i in range(50) if len(make_scene(0, i).objects) > 1)
    with pytest.raises(ValueError, match="single-object"):
        zero_shot_label(multi, "shape")
    with pytest.raises(ValueError, match="split"):
        make_scene(0, 0, "test")
