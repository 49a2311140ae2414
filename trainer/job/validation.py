"""Every check of a job config that needs neither data nor models, before any work.

Each failed check is a ValueError that names the key and what to change. The
chosen backend checks its own share of the DeepSpeed config (and warns about
the keys it ignores). With ``data.num_examples`` left out (0, shards only), the
checks that need N wait for the shards' index: :func:`validate_data_size`.
"""

from __future__ import annotations

from trainer.common.config import JobConfig, delta_of
from trainer.job.backend import backend_class
from trainer.job.geometry import Geometry, geometry


def validate(cfg: JobConfig, world_size: int, allow_non_private: bool) -> Geometry:
    """The job's geometry on ``world_size`` ranks, once every check passed; raises ValueError."""
    backend = backend_class(cfg.backend)
    geo = geometry(cfg, world_size)
    p = cfg.privacy
    if cfg.steps < 1:
        raise ValueError(f"steps must be >= 1, got {cfg.steps}")
    if cfg.data.source not in ("synthetic", "shards", "classes"):
        raise ValueError(f"data.source must be synthetic, shards or classes, got {cfg.data.source!r}")
    if cfg.is_classifier:
        _check_finetune(cfg)
    elif cfg.data.classes:
        raise ValueError(f"data.classes is for a classification job (data.source=classes, e.g. --config "
                         f"finetune_own), not data.source={cfg.data.source}")
    if cfg.data.num_examples < 0 or (cfg.data.num_examples == 0 and cfg.data.source == "synthetic"):
        raise ValueError("data.num_examples (N, the data set size: how many synthetic examples to write) "
                         "must be set: q = B / N")
    if not p.enabled:
        if not allow_non_private:
            raise ValueError("privacy.enabled=false trains WITHOUT differential privacy; pass "
                             "--allow-non-private to confirm")
    else:
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ValueError("set privacy.noise_multiplier or privacy.target_epsilon (then sigma "
                             "is calibrated)")
        if p.noise_multiplier is not None and p.noise_multiplier < 0:
            raise ValueError(f"privacy.noise_multiplier must be >= 0, got {p.noise_multiplier}")
        if p.target_epsilon is not None and p.target_epsilon <= 0:
            raise ValueError(f"privacy.target_epsilon must be > 0, got {p.target_epsilon}")
        if p.max_grad_norm <= 0:
            raise ValueError(f"privacy.max_grad_norm must be > 0, got {p.max_grad_norm}")
        if p.accountant not in ("rdp", "pld"):
            raise ValueError(f"privacy.accountant must be rdp or pld, got {p.accountant!r}")
        if p.delta is not None and not 0 < p.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {p.delta}")
        if p.tan_reference_batch is not None and p.tan_reference_batch < geo.batch_size:
            raise ValueError(f"privacy.tan_reference_batch {p.tan_reference_batch} must be >= "
                             f"ds train_batch_size {geo.batch_size} (TAN simulates a larger "
                             f"batch with a smaller one)")
    if cfg.privacy.tan_reference_batch is not None and not p.enabled:
        raise ValueError("privacy.tan_reference_batch needs privacy.enabled=true")
    o = cfg.optim
    decay = o.decay_steps if o.decay_steps is not None else cfg.steps
    if o.warmup_steps < 0 or o.warmup_steps > decay:
        raise ValueError(f"optim.warmup_steps {o.warmup_steps} must be in [0, decay_steps {decay}]")
    if o.lr is None and (o.blr is None or o.blr <= 0):
        raise ValueError("set optim.blr > 0 or optim.lr")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ValueError("optim.min_lr_ratio must be in [0, 1]")
    if cfg.eval.zero_shot and not cfg.is_captioner:
        raise ValueError(f"eval.zero_shot needs a DP-Cap model, not {cfg.model.name}; set "
                         f"eval.zero_shot=false")
    if cfg.checkpoint.keep_last < 1:
        raise ValueError("checkpoint.keep_last must be >= 1")
    _check_ds_config(cfg, geo)
    backend.check_config(cfg, geo)
    if cfg.data.num_examples:
        validate_data_size(cfg, geo)
    return geo


def validate_data_size(cfg: JobConfig, geo: Geometry) -> None:
    """The checks that need N (``data.num_examples``, given or taken from the index)."""
    n, p = cfg.data.num_examples, cfg.privacy
    if geo.batch_size > n:
        raise ValueError(f"ds train_batch_size {geo.batch_size} exceeds data.num_examples {n}")
    if not p.enabled:
        return
    delta = delta_of(cfg)
    if not 0 < delta < 1:
        raise ValueError(f"privacy.delta must be in (0, 1), got {delta}")
    if delta > 1.0 / n:
        raise ValueError(f"privacy.delta {delta:g} exceeds 1/N = {1 / n:g}; a delta above 1/N does not "
                         f"protect individuals")
    if p.tan_reference_batch is not None and p.tan_reference_batch > n:
        raise ValueError("privacy.tan_reference_batch exceeds data.num_examples")


def _check_finetune(cfg: JobConfig) -> None:
    """A classification job's finetune section (data.classes is read at the job's start)."""
    f = cfg.finetune
    last = f.layers.startswith("last:") and f.layers[5:].isdigit() and int(f.layers[5:]) >= 1
    if f.layers not in ("head", "all") and not last:
        raise ValueError(f"finetune.layers must be head, all or last:K (K >= 1 blocks), got {f.layers!r}")
    if f.views < 1:
        raise ValueError(f"finetune.views must be >= 1, got {f.views}")
    if not 0 <= f.ema < 1:
        raise ValueError(f"finetune.ema must be in [0, 1) (0: no average), got {f.ema}")
    if not 0 < f.crop <= 1:
        raise ValueError(f"finetune.crop (the smallest crop's share of the area) must be in (0, 1], got {f.crop}")
    if f.eval_every < 0:
        raise ValueError(f"finetune.eval_every must be >= 0, got {f.eval_every}")


def _check_ds_config(cfg: JobConfig, geo: Geometry) -> None:
    """What no backend can honour in a private step."""
    ds, private = cfg.ds, cfg.privacy.enabled
    if ds.get("gradient_clipping") and private:
        raise ValueError(f"ds_config {cfg.ds_config}: gradient_clipping must not be set with "
                         f"differential privacy (per-example clipping to privacy.max_grad_norm "
                         f"replaces it); remove it")
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError(f"ds_config {cfg.ds_config}: fp16.enabled is not supported (its loss scaling "
                         f"would scale the per-example gradients before clipping); use bf16.enabled")
