"""Where the run is: its step, its secret sampling seed, its lineage, who wrote it.

Lineage: a random id, the real path of the run's checkpoint folder and the run's
name. Resuming anything but a plain requeue of the same run (a copied folder,
another run's checkpoint.dir, a config changed beyond ``steps`` and the keys of
:data:`REQUEUE_KEYS`) is a new branch: a fresh secret salt is mixed into the noise
and sampling seeds, so two continuations of one checkpoint never draw the same
noise, which would cancel in the difference of their released models.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

from trainer.common.config import JobConfig

logger = logging.getLogger(__name__)

# config keys a plain requeue may change (they change nothing that is drawn or trained
# bit for bit); any other change makes a resumed run a new branch with salted seeds
REQUEUE_KEYS = ("steps", "metrics", "checkpoint.every_steps", "checkpoint.keep_last", "collective_timeout_s",
                "data.worker_timeout_s", "data.num_workers")


class TrainState:
    """``backend`` and ``world_size`` are this job's: a checkpoint's are checked before it is
    loaded (the name by the trainer, the world size by ``Backend.check_resume``), not taken."""

    def __init__(self, cfg: JobConfig, sampling_seed: int, backend: str, world_size: int):
        self.step = 0
        self.sampling_seed = sampling_seed
        self.backend = backend
        self.world_size = world_size
        self.lineage: dict[str, Any] = {"id": uuid.uuid4().hex,
                                        "checkpoint_dir": os.path.realpath(cfg.checkpoint_dir),
                                        "name": cfg.name, "parent": None, "salts": []}
        self._fresh_lineage = self.lineage
        self.saved_lineage: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "sampling_seed": self.sampling_seed, "lineage": self.lineage,
                "backend": self.backend, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if missing := [key for key in ("step", "sampling_seed") if state.get(key) is None]:
            raise ValueError(f"its train state has no {' or '.join(missing)}")
        self.step = int(state["step"])
        self.sampling_seed = int(state["sampling_seed"])
        self.saved_lineage = state.get("lineage")
        if self.saved_lineage is not None:  # a plain requeue keeps it; branch() replaces it
            self.lineage = self.saved_lineage

    def branch(self, reasons: list[str], salt: int | None, source: str) -> None:
        """This run continues ``source`` as a new branch: a child of the saved lineage,
        recording ``salt`` (mixed into the secret seeds by the caller; None in a non-private
        run, which has no secret seed)."""
        old = self.saved_lineage or {}
        self.lineage = {**self._fresh_lineage, "parent": old.get("id"), "salts": old.get("salts", [])}
        if salt is not None:
            self.lineage["salts"] = [*self.lineage["salts"], {"step": self.step, "from": source, "salt": salt,
                                                              "reasons": reasons}]


def branch_reasons(cfg: JobConfig, saved: dict[str, Any]) -> list[str]:
    """Why resuming a checkpoint (its ``train_state`` and ``config``) is not a plain requeue of
    the run that wrote it; empty for a requeue."""
    lineage = saved["train_state"].get("lineage")
    if lineage is None:
        return ["the checkpoint records no lineage"]
    reasons = []
    here = os.path.realpath(cfg.checkpoint_dir)
    if lineage["checkpoint_dir"] != here:
        reasons.append(f"it was written in {lineage['checkpoint_dir']}, not in {here} (a copied or "
                       f"another run's checkpoint folder)")
    if lineage["name"] != cfg.name:
        reasons.append(f"it was written by run {lineage['name']!r}, not {cfg.name!r}")
    old, now = _flat(saved.get("config", {})), _flat(json.loads(json.dumps(cfg.to_dict(), default=str)))
    changed = sorted(k for k in old.keys() | now.keys() if old.get(k) != now.get(k)
                     and not any(k == r or k.startswith(r + ".") for r in REQUEUE_KEYS))
    if changed:
        reasons.append(f"the config changed ({', '.join(changed[:8])}{' ...' * (len(changed) > 8)})")
    return reasons


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict as dotted key -> leaf value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
