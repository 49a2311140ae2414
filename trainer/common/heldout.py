"""The held-out synthetic images a model is judged on (data.synthetic's "heldout" split).

Single-object scenes never trained on; the end-of-job evaluation and the probe
tool label them by colour, shape or object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.common.config import JobConfig
from trainer.common.inputs import transform

TASKS = ("colour", "shape", "object")  # data.synthetic's ZERO_SHOT_TASKS plus the object's colour


@dataclass(frozen=True, kw_only=True)
class HeldOut:
    """Which held-out scenes, and how they become model inputs."""

    seed: int  # data.seed: the synthetic data set the scenes are held out from
    count: int  # data.heldout_examples
    img_size: int
    to_pixels: object  # data.transform.ImageTextTransform at the job's image size, never augmented

    @classmethod
    def of(cls, cfg: JobConfig) -> HeldOut:
        return cls(seed=cfg.data.seed, count=cfg.data.heldout_examples,
                   img_size=cfg.img_size, to_pixels=transform(cfg, None))

    def scenes(self, count: int) -> list:
        from data import synthetic

        return [synthetic.make_scene(self.seed, i, "heldout") for i in range(count)]

    def task(self, task: str, count: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[list[str]]]:
        """The first ``count`` images, their labels for ``task``, and each class's phrasings
        as the captions say them ("<size> <colour> <shape>")."""
        from data import synthetic

        if task not in TASKS:
            raise ValueError(f"eval.tasks: {task!r} is not one of {TASKS}")
        scenes = self.scenes(self.count if count is None else count)
        images = self.pixels(scenes)
        sizes, colours, shapes = synthetic.SIZES, list(synthetic.COLOURS), synthetic.SHAPES
        if task == "colour":
            labels = [colours.index(scene.objects[0].colour) for scene in scenes]
            classes = [[f"{s} {c} {n}" for s in sizes for n in shapes] for c in colours]
        else:
            labels = [synthetic.zero_shot_label(scene, task) for scene in scenes]
            if task == "shape":
                classes = [[f"{s} {c} {n}" for s in sizes for c in colours] for n in shapes]
            else:
                classes = [[f"{s} {name}" for s in sizes] for name in synthetic.ZERO_SHOT_TASKS[task]]
        return images, torch.tensor(labels), classes

    def pixels(self, scenes: list) -> torch.Tensor:
        from data import synthetic

        return torch.stack([self.to_pixels(synthetic.render(scene, self.img_size), "")[0] for scene in scenes])
