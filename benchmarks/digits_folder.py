"""Export scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, 10 classes) to a
class folder of PNGs, for the fine-tuning benchmark (BENCHMARKS.md): real images the project
does not generate, and no download (the data ship inside the scikit-learn wheel).

    python benchmarks/digits_folder.py /tmp/digits --size 32   # scikit-learn: setup.cfg's bench extra

writes OUT/<digit>/<index>.png (the digit's name as the class folder), each scan's 17 grey
levels stretched to 0-255 and upscaled to SIZE x SIZE (nearest neighbour).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=32, help="side of the written images (the model's img_size)")
    args = parser.parse_args()
    from sklearn.datasets import load_digits

    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    for index, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = args.out / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        grey = (np.asarray(image) * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(grey).resize((args.size, args.size), Image.Resampling.NEAREST).convert("RGB").save(
            folder / f"{index:04d}.png")
    print(f"wrote {len(digits.target)} images of {len(names)} classes to {args.out}")


if __name__ == "__main__":
    main()
