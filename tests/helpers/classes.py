"""A tiny classification job: the encoder's overrides and a class folder of noisy single-colour
images (tests/test_trainer_finetune.py and its subprocess tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TINY = ["model.overrides.img_size=16", "model.overrides.patch_size=8", "model.overrides.embed_dim=16",
        "model.overrides.depth=2", "model.overrides.num_heads=2", "model.overrides.decoder_embed_dim=16",
        "model.overrides.decoder_depth=1", "model.overrides.decoder_num_heads=2"]


def write_folder(root: Path, classes=("cat", "dog", "owl"), per_class: int = 6, split: bool = False) -> Path:
    """``per_class`` noisy single-colour PNGs per class (a quarter in val/ with ``split``)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        for i in range(per_class):
            sub = root / (("val" if i < per_class // 4 else "train") if split else "") / name
            sub.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 181 + 20) % 256])
            pixels = np.clip(colour + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(sub / f"{name}_{i}.png")
    return root
