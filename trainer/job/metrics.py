"""TensorBoard scalars and text, and the rank-0 progress bar (ETA, epsilon).

Only rank 0 writes; the trainer reduces across ranks before calling in.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

logger = logging.getLogger(__name__)

# dense bf16 matrix peak per device (spec sheets); MFU is not reported for others
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


class Metrics:
    def __init__(self, log_dir: Path, enabled: bool, total_steps: int, start_step: int,
                 progress: bool):
        self.enabled = enabled
        self.writer = SummaryWriter(str(log_dir)) if enabled else None
        self.bar = None
        if enabled and progress:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 10.0)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
