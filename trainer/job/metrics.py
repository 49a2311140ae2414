"""What a run reports: TensorBoard scalars and text, and the rank-0 progress bar.

:class:`Metrics` writes (rank 0 only); :class:`MetricsProcessor` decides what is
written: it sums each step's outputs into a window, reduces the window across
ranks every ``metrics.log_every`` steps (a collective: every rank calls it), and
turns it into the TensorBoard keys: loss, lr, throughput, achieved TFLOP/s and
MFU, bytes reduced, skipped samples, and, in a private run, epsilon (RDP at every
log, PLD every ``metrics.pld_every`` steps: it costs seconds), sigma, q and the
clipping statistics. None of these are noised: see the README on what a log
reveals.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from trainer.common.config import MetricsConfig
from trainer.job.distributed import Distributed, reduce_floats
from trainer.job.ledger import PrivacyLedger

logger = logging.getLogger(__name__)

# dense bf16 matrix peak per device (spec sheets); MFU is not reported for others
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "V100": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


class Metrics:
    def __init__(self, log_dir: Path, enabled: bool, total_steps: int, progress: bool):
        self.enabled = enabled
        self.writer = SummaryWriter(str(log_dir)) if enabled else None
        self.total_steps = total_steps
        self.show_progress = enabled and progress
        self.bar = None

    def open_progress(self, start_step: int) -> None:
        """The progress bar, from ``start_step`` (where a resumed run starts)."""
        if self.show_progress and self.bar is None:
            self.bar = tqdm(total=self.total_steps, initial=start_step, unit="step", file=sys.stderr,
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


class MetricsProcessor:
    """``bytes_sent`` and ``skipped`` report the backend reducer's bytes of the last step and
    rank 0's reader's skipped samples so far (checkpoints keep rank 0's counts)."""

    WINDOW = ("loss_sum", "examples", "clipped", "skipped")

    def __init__(self, writer: Metrics, cfg: MetricsConfig, d: Distributed, ledger: PrivacyLedger,
                 flops_per_example: float, reader: Any, reducer: Any):
        self.writer, self.cfg, self.dist, self.ledger = writer, cfg, d, ledger
        self.flops_per_example = flops_per_example
        self.reader, self.reducer = reader, reducer
        self.last_pld: float | None = None  # shown by the progress bar between PLD evaluations
        self._bad_samples = reader.skipped  # undecodable samples rank 0's reader skipped so far
        self.start_window()

    def start_window(self) -> None:
        """A new window of steps to sum (its clock starts now)."""
        self.window = dict.fromkeys(self.WINDOW, 0.0) | {"steps": 0}
        self._t0 = time.perf_counter()

    def state_dict(self) -> dict[str, Any]:
        return {"last_pld": self.last_pld}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_pld = state.get("last_pld")

    def record(self, step: int, out: dict[str, float], last: bool) -> None:
        """Step ``step`` is done with outputs ``out``; ``last``: the run's last step. Collective
        when it logs (every ``log_every`` steps and at the last)."""
        for key in self.WINDOW:
            self.window[key] += out[key]
        self.window["steps"] += 1
        if step % self.cfg.log_every == 0 or last:
            self._log(step, out, time.perf_counter() - self._t0, last)
            self.start_window()

    def _log(self, step: int, out: dict[str, float], seconds: float, last: bool) -> None:
        w = self.window
        loss_sum, examples, clipped, skipped = reduce_floats(
            [w["loss_sum"], w["examples"], w["clipped"], w["skipped"]], self.dist.device)
        bad_samples = self.reader.skipped
        if bad_samples > self._bad_samples and self.dist.is_main:
            logger.warning("rank 0 has skipped %d undecodable samples so far: %s", bad_samples,
                           dict(getattr(self.reader, "skipped_reasons", {})))
        self._bad_samples = bad_samples
        steps = max(1, w["steps"])
        values = {"train/loss": loss_sum / max(1, examples), "train/lr": out["lr"],
                  "train/examples_per_s": examples / max(seconds, 1e-9),
                  "train/realised_batch": examples / steps,
                  "comm/bytes_per_step": float(self.reducer.bytes_sent),
                  "data/skipped_samples_rank0": float(bad_samples)}
        ledger = self.ledger
        if ledger.enabled:
            values.update({"privacy/epsilon_rdp": ledger.epsilon("rdp"), "privacy/sigma": ledger.plan.sigma,
                           "privacy/q": ledger.plan.q,
                           "privacy/clip_fraction": clipped / max(1, examples - skipped),
                           "privacy/skipped_nonfinite": skipped})
            values.update({f"privacy/{k}_rank0": v for k, v in out.items() if k.startswith("norm_")})
            if self.cfg.pld_every and (step % self.cfg.pld_every == 0 or last):
                values["privacy/epsilon_pld"] = ledger.epsilon("pld")
        # the model's training FLOPs at the achieved rate (the engine's own work not counted)
        rate = self.flops_per_example * examples / max(seconds, 1e-9)
        values["train/tflops_per_s"] = rate / 1e12
        device = self.dist.device
        if device.type == "cuda":
            values["gpu/max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if peak := peak_flops(device):
                values["gpu/mfu"] = rate / (peak * self.dist.world_size)
        self.writer.scalars(step, values)
        postfix = {"loss": f"{values['train/loss']:.3f}"}
        if ledger.enabled:
            self.last_pld = values.get("privacy/epsilon_pld", self.last_pld)
            postfix |= {"eps_rdp": f"{values['privacy/epsilon_rdp']:.3f}",
                        "eps_pld": "pending" if self.last_pld is None else f"{self.last_pld:.3f}"}
        else:
            postfix["eps"] = "off (non-private)"
        self.writer.progress(step, postfix)
        self.writer.flush()
