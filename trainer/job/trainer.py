"""The training job: one :class:`Trainer`, built in a fixed order, that resumes by itself.

Order: checks (before any work), distributed, the data's size (from the shards'
index, built first if another tool wrote them) and the privacy plan, model and
what the evaluation will read, ``--init`` weights, the privacy engine on the bare
model, the backend (sharding and optimizer), the reader, checkpointer and resume,
metrics. Everything here is the same for every backend; ``trainer.job.backend``
is the seam.

Ranks agree before they train: rank 0 chooses the checkpoint to resume, every
rank must see it, and after loading every rank's step, secret seeds, N and shard
list are compared (``trainer.job.distributed.agree``).

Lineage: ``meta.json`` holds a random lineage id, the real path of the run's
checkpoint folder and the run's name. Resuming anything but a plain requeue of
the same run (a copied folder, another run's checkpoint.dir, a config changed
beyond ``steps`` and the keys of :data:`REQUEUE_KEYS`) mixes a fresh secret salt
into the noise and sampling seeds: two continuations of one checkpoint never draw
the same noise, which would cancel in the difference of their released models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import signal
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from privacy import accounting
from trainer.common.build import build_model, build_tokenizer
from trainer.common.checkpoints import read_meta, step_folder
from trainer.common.config import JobConfig, learning_rate
from trainer.common.evaluation import (
    caption_examples,
    captions_markdown,
    evaluate,
    folder_captions,
    folder_plan,
    prompt_hint,
    write_results,
)
from trainer.common.heldout import HeldOut
from trainer.common.probing import folder_data
from trainer.job import plan as privacy_plan
from trainer.job import tasks
from trainer.job.backend import create_backend
from trainer.job.checkpoint import Checkpointer
from trainer.job.data import InMemoryReader, build_reader, count_examples, prepare_shards, sample_captions
from trainer.job.distributed import Distributed, agree, from_rank0, init_distributed, launcher_env
from trainer.job.metrics import Metrics, peak_flops
from trainer.job.optim import lr_factor
from trainer.job.run_lock import RunLock, releases_lock_on_error
from trainer.job.validation import validate, validate_data_size

logger = logging.getLogger(__name__)


# config keys a plain requeue may change (they change nothing that is drawn or trained
# bit for bit); any other change makes a resumed run a new branch with salted seeds
REQUEUE_KEYS = ("steps", "metrics", "checkpoint.every_steps", "checkpoint.keep_last", "collective_timeout_s",
                "data.worker_timeout_s", "data.num_workers")


def _step_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]) & (2**63 - 1)


class Trainer:
    """One training job. ``model_factory``/``train_data`` replace the defaults
    (models.create_model, the data/ reader); ``evaluate_at_end`` runs the end-of-job
    evaluation (captions, zero-shot accuracy, probes, as ``cfg.eval`` asks)."""

    @releases_lock_on_error
    def __init__(self, cfg: JobConfig, *, allow_non_private: bool = False,
                 local_rank: int | None = None,
                 model_factory: Callable[[JobConfig, Any], nn.Module] | None = None,
                 train_data: Sequence | None = None,
                 evaluate_at_end: bool = False):
        self.cfg = cfg
        # every check that needs neither data nor models, before any work
        _, _, world = launcher_env(local_rank)
        self.geo = validate(cfg, world, allow_non_private)

        # 1. distributed
        self.dist: Distributed = init_distributed(local_rank, cfg.collective_timeout_s)
        device = self.dist.device
        # one job per checkpoint folder, before anything reads or writes it
        self.lock = RunLock.acquire(cfg.checkpoint_dir, cfg.checkpoint.lock_lease_s, self.dist.rank)

        # 2. the data's size N (q = B / N), then the privacy plan
        self.task = tasks.for_job(cfg, self.dist.is_main)  # a class folder is read (and checked) now
        if cfg.is_classifier and train_data is None:
            train_data = self.task.train
            tasks.log_start(self.task, self.dist.is_main)
        index = prepare_shards(cfg, self.dist) if train_data is None else None
        if index is not None:
            self._check_data_size(count_examples(index), "the number of samples the index of data.shards lists")
        else:
            self._check_data_size(len(train_data), "the readable training images of data.classes"
                                  if cfg.is_classifier else "the size of the in-memory data set")
        self.plan = privacy_plan.resolve(cfg, self.geo)

        # 3. model (same init on every rank), its weights
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg)
        model = (model_factory or build_model)(cfg, self.tokenizer).to(device)
        self.flops_per_example = self._count_flops(model)
        self.evaluate_at_end = evaluate_at_end
        self._prepare_evaluation(index)
        self.init_privacy = None
        if cfg.init:
            try:
                self.task.load_init(model, cfg.init)
            except ValueError as e:
                raise ValueError(f"--init {e}") from None
            self.init_privacy = self._init_privacy(Path(cfg.init))

        # 4. privacy engine on the bare model (it records full parameter shapes, which a
        # backend may partition), with the backend's reducer; one secret seed (never from
        # the config) shared by all ranks seeds the noise (each rank on its own stream)
        # and the Poisson sampling
        self.backend = create_backend(cfg, self.geo, self.dist, private=self.plan.enabled)
        self.engine = None
        if self.plan.enabled:
            from privacy import PrivacyEngine

            secret = self._shared_secret_seed()
            self.engine = PrivacyEngine(model, max_grad_norm=self.plan.max_grad_norm,
                                        noise_multiplier=self.plan.sigma,
                                        expected_batch_size=self.geo.batch_size,
                                        seed=secret, reducer=self.backend.reducer)
            sampling_seed = _step_seed(secret, 1)
        else:
            sampling_seed = cfg.seed

        # 5. sharding and optimizer; the lr schedule is a function of the step
        self.model = self.backend.setup(model)
        self.peak_lr = learning_rate(cfg)

        # 6. data: the Poisson sampler (same seed on every rank) decides each step's examples
        from privacy.sampling import PoissonSampler

        self.sampler = PoissonSampler(cfg.data.num_examples, self.plan.q, sampling_seed,
                                      world_size=self.dist.world_size, rank=self.dist.rank,
                                      max_physical_batch=self.geo.micro_batch)
        if cfg.is_classifier:
            self.reader = self.task.reader(self.sampler)
        elif train_data is None:
            self.reader = build_reader(cfg, index, self.sampler, self.tokenizer,
                                       pin_memory=device.type == "cuda")
        else:
            self.reader = InMemoryReader(train_data, self.sampler)
        self._empty = self.task.empty()

        # 7. checkpointer; resume
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, self.dist.rank, self.lock)
        self.step = 0
        self.segments: list[accounting.Segment] = [self.plan.segment(0)]
        self.resumed_from = None
        self.lineage = {"id": uuid.uuid4().hex, "checkpoint_dir": os.path.realpath(cfg.checkpoint_dir),
                        "name": cfg.name, "parent": None, "salts": []}
        if (latest := self.checkpointer.start(cfg.checkpoint.resume)) is not None:
            self._resume(latest)
        self._check_ranks_agree(index)
        self.stop_at = self._privacy_stop()

        # 8. metrics
        self.metrics = Metrics(cfg.log_dir, enabled=self.dist.is_main, total_steps=cfg.steps,
                               start_step=self.step, progress=cfg.metrics.progress)
        self.stop_requested = False
        self._last_pld: float | None = None  # shown by the progress bar between PLD evaluations
        self._bad_samples = self.reader.skipped  # undecodable samples rank 0's reader skipped so far

    # ------------------------------------------------------------------ set-up helpers

    def _check_data_size(self, num_examples: int, source: str) -> None:
        """N as given (it must be the data's), or, left out (0), the data's, said once."""
        cfg = self.cfg
        if cfg.data.num_examples == 0:
            cfg.data.num_examples = num_examples
            if self.dist.is_main:
                logger.info("data.num_examples not set: N = %s, %s (q = B / N = %.4g)", f"{num_examples:,}",
                            source, self.geo.batch_size / num_examples)
        elif num_examples != cfg.data.num_examples:
            raise ValueError(f"data.num_examples={cfg.data.num_examples} but the data set has {num_examples} "
                             f"examples; set data.num_examples={num_examples}, or leave it out "
                             f"(data.num_examples=0) to take it from the data")
        validate_data_size(cfg, self.geo)

    def _prepare_evaluation(self, index) -> None:
        """What the end-of-job evaluation (and the periodic captions) will judge, checked now,
        before training: the held-out synthetic images when training on synthetic data, and
        eval.data, a folder of your classes."""
        cfg = self.cfg
        self.heldout = HeldOut.of(cfg) if cfg.data.source == "synthetic" else None
        self.eval_folder, self.eval_section = None, cfg.eval
        if cfg.is_classifier:
            return  # the class folder's validation images (trainer.job.tasks.Classification)
        if self.evaluate_at_end and cfg.eval.data:
            self.eval_folder = folder_data(Path(cfg.eval.data), cfg, cfg.eval.val_fraction, cfg.eval.max_per_class,
                                           setting=f"eval.data={cfg.eval.data}")
            self.eval_section, notes = folder_plan(cfg.eval, self.eval_folder, self.tokenizer,
                                                   cfg.data.text_length, cfg.is_captioner)
            for note in notes if self.dist.is_main else ():
                logger.warning("eval.data: %s", note)
            if cfg.is_captioner and cfg.eval.zero_shot and self.dist.is_main:
                hint = prompt_hint(cfg.eval.prompt, self.eval_folder.classes, sample_captions(cfg, index))
                if hint:
                    logger.warning("eval.data: %s", hint)
        elif self.evaluate_at_end and self.heldout is None and self.dist.is_main:
            logger.warning("no eval.data: nothing will judge this model at the end (the synthetic tasks run "
                           "only when training on synthetic data); set eval.data=FOLDER, a folder of class "
                           "folders, to evaluate it on your classes")

    def _init_privacy(self, path: Path) -> dict[str, Any] | None:
        """What ``--init`` weights of ours cost in privacy (their meta.json), said at once: this
        run's epsilon is this run's alone, and the weights' total cost composes both."""
        if not path.is_dir():
            return None  # a weights file: nothing recorded about how it was trained
        meta = read_meta(step_folder(path))
        privacy = meta.get("privacy") or {}
        if not privacy.get("enabled"):
            if self.dist.is_main:
                logger.info("--init %s: weights trained without differential privacy (privacy.enabled=false)",
                            path)
            return {"enabled": False}
        found = {"enabled": True, "epsilon_rdp": meta.get("epsilon_rdp"), "delta": privacy.get("delta")}
        if self.dist.is_main:
            logger.warning("--init %s: these weights were trained privately to epsilon %.4g (RDP) at delta %.3g "
                           "on their own data. The epsilon this run reports is this run's alone: the released "
                           "model's total privacy cost composes both (for data in both runs, at least their sum)",
                           path, found["epsilon_rdp"], found["delta"])
        return found

    def _shared_secret_seed(self) -> int:
        if self.cfg.privacy.secret_seed is not None:
            logger.warning("privacy.secret_seed is set: noise and batches are reproducible by anyone who "
                           "knows it; do not release models trained this way")
            return self.cfg.privacy.secret_seed
        seed = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=self.dist.device)
        dist.broadcast(seed, src=0)
        return int(seed.item())

    def _count_flops(self, model: nn.Module) -> float:
        """Training FLOPs per example (forward + backward, non-private), counted on one example."""
        from torch.utils.flop_counter import FlopCounterMode

        sample = self.task.sample(self.dist.device)
        with FlopCounterMode(display=False) as counter:
            self._loss(model, sample).sum().backward()
        model.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def _privacy_state(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments], "delta": self.plan.delta,
                "max_grad_norm": self.plan.max_grad_norm, "enabled": self.plan.enabled}

    def _check_ranks_agree(self, index) -> None:
        """Before training: every rank resumed the same step with the same secret seeds (compared
        as hashes: the seeds stay out of every message), the same N and the same shard list."""
        def hashed(value: Any) -> str:
            return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]

        shards = ([[str(p), int(c)] for p, c in zip(index.paths, index.counts)] if index is not None
                  else len(self.reader.dataset))
        noise_seed = self.engine.state_dict()["seed"] if self.engine is not None else None
        agree({"step": self.step, "noise seed (hash)": hashed(noise_seed),
               "sampling seed (hash)": hashed(self.sampler.seed), "data.num_examples": self.cfg.data.num_examples,
               "shard list and counts (hash)": hashed(shards)}, "the run they start")

    def _branch_reasons(self, meta: dict[str, Any]) -> list[str]:
        """Why resuming ``meta``'s checkpoint is not a plain requeue of the run that wrote it."""
        lineage = meta.get("lineage")
        if lineage is None:
            return ["the checkpoint records no lineage"]
        reasons = []
        here = os.path.realpath(self.cfg.checkpoint_dir)
        if lineage["checkpoint_dir"] != here:
            reasons.append(f"it was written in {lineage['checkpoint_dir']}, not in {here} (a copied or "
                           f"another run's checkpoint folder)")
        if lineage["name"] != self.cfg.name:
            reasons.append(f"it was written by run {lineage['name']!r}, not {self.cfg.name!r}")
        saved, now = _flat(meta.get("config", {})), _flat(json.loads(json.dumps(self.cfg.to_dict(), default=str)))
        changed = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k)
                         and not any(k == r or k.startswith(r + ".") for r in REQUEUE_KEYS))
        if changed:
            reasons.append(f"the config changed ({', '.join(changed[:8])}{' ...' * (len(changed) > 8)})")
        return reasons

    def _branch(self, path: Path, meta: dict[str, Any]) -> None:
        """A plain requeue keeps the checkpoint's lineage and seeds (bit-identical to an
        uninterrupted run); any other continuation is a new branch whose secret seeds get a
        fresh salt, so that no two continuations of one checkpoint share noise or batches."""
        # rank 0's view decides for all
        reasons, salt = from_rank0((self._branch_reasons(meta), int.from_bytes(os.urandom(8), "big") & (2**62 - 1)))
        if not reasons:
            self.lineage = meta["lineage"]
            return
        old = meta.get("lineage") or {}
        self.lineage = {**self.lineage, "parent": old.get("id"), "salts": old.get("salts", [])}
        if not self.plan.enabled:  # nothing secret to salt: the sampling seed is the config's
            return
        engine_state = self.engine.state_dict()
        self.engine.load_state_dict({**engine_state, "seed": _step_seed(engine_state["seed"], salt)})
        self.sampler.seed = _step_seed(self.sampler.seed, salt)
        self.lineage["salts"] = [*self.lineage["salts"], {"step": self.step, "from": str(path), "salt": salt,
                                                          "reasons": reasons}]
        if self.dist.is_main:
            logger.warning("resuming %s as a new branch (%s): a fresh secret salt is mixed into the noise and "
                           "sampling seeds, so this continuation never reuses the noise of another one from "
                           "the same checkpoint", path, "; ".join(reasons))

    def _resume(self, path) -> None:
        meta = read_meta(path)
        saved_backend = meta.get("backend", "fsdp2")  # checkpoints before the backend seam are FSDP2's
        if saved_backend != self.cfg.backend:
            raise ValueError(f"{path} was written by backend={saved_backend}; resume with "
                             f"backend={saved_backend}, or start a new checkpoint.dir from its weights "
                             f"with --init {path}")
        if self.cfg.backend == "deepspeed" and meta["world_size"] != self.dist.world_size:
            raise ValueError(f"{path} was written by {meta['world_size']} ranks; a DeepSpeed checkpoint "
                             f"resumes on the same number of ranks (backend=fsdp2 reshards)")
        old = meta["privacy"]
        if old["enabled"] != self.plan.enabled:
            raise ValueError(f"{path} was trained with privacy.enabled={old['enabled']}; "
                             f"resume with the same setting or use a new checkpoint.dir")
        if self.plan.enabled:
            sigma, q, _ = old["segments"][-1]
            changed = [name for name, a, b in (("sigma", sigma, self.plan.sigma),
                                               ("q", q, self.plan.q),
                                               ("delta", old["delta"], self.plan.delta),
                                               ("max_grad_norm", old["max_grad_norm"], self.plan.max_grad_norm))
                       if not math.isclose(a, b, rel_tol=1e-12)]
            if changed and not self.cfg.privacy.allow_privacy_change:
                raise ValueError(f"resuming {path} with changed {', '.join(changed)}; set "
                                 f"privacy.allow_privacy_change=true to compose the privacy cost "
                                 f"of both settings, or start a new checkpoint.dir")
            segments = [tuple(s) for s in old["segments"]]
            self.segments = segments + [self.plan.segment(0)] if changed else segments
        Checkpointer.load(path, self.backend)
        if self.engine is not None:
            self.engine.load_state_dict(meta["engine"])
        # the secret sampling seed of the run being resumed (a fresh one was drawn above)
        self.sampler.seed = int(meta["sampling_seed"])
        self.step = int(meta["step"])
        self.reader.load_state_dict({**meta["reader"], "next_step": self.step})
        self._branch(path, meta)
        self.resumed_from = str(path)
        logger.info("resumed from %s at step %d", path, self.step)

    def _privacy_stop(self) -> int:
        """The step the guard stops at: cfg.steps, or earlier if the target epsilon is reached."""
        if not self.plan.enabled:
            return self.cfg.steps
        closed, current = self.segments[:-1], self.segments[-1]
        start = self.step - current[2]
        allowed = privacy_plan.budget_steps(closed, self.plan, self.cfg.steps - start)
        if start + allowed < self.cfg.steps:
            logger.warning("privacy guard: target epsilon %s is reached after step %d of %d; "
                           "training stops there", self.plan.target_epsilon, start + allowed,
                           self.cfg.steps)
        return start + allowed

    # ------------------------------------------------------------------ state

    def epsilon(self, method: str = "rdp") -> float:
        if not self.plan.enabled:
            return math.inf
        return accounting.epsilon_of_segments(self.segments, self.plan.delta, method)

    def save(self) -> None:
        meta = {"step": self.step, "privacy": self._privacy_state(),
                "engine": self.engine.state_dict() if self.engine is not None else None,
                "sampling_seed": self.sampler.seed, "backend": self.backend.name,
                "world_size": self.dist.world_size, "config": self.cfg.to_dict(),
                "reader": self.reader.state_dict(),  # rank 0's; every rank's position is the step
                "lineage": self.lineage,
                "epsilon_rdp": self.epsilon("rdp") if self.plan.enabled else None}
        self.checkpointer.save(self.step, self.backend, meta)

    # ------------------------------------------------------------------ the step

    def _loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """One loss per row: per example, or per view of an example (``task.views`` rows each)."""
        return self.task.loss(model, batch)

    def _to_device(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        dtype = self.backend.compute_dtype
        return tuple(x.to(self.dist.device, dtype=dtype if x.is_floating_point() else None, non_blocking=True)
                     for x in batch)

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, ...]], n_micro: int) -> dict[str, float]:
        """One logical step: this rank's micro-batches, padded with empty ones to
        `n_micro` (the same on every rank), then the noised update."""
        # same RNG on every rank and step (ViP masking); resume-exact
        torch.manual_seed(_step_seed(self.cfg.seed, self.step, self.dist.rank))
        lr = self.peak_lr * lr_factor(self.step, self.cfg.optim.warmup_steps,
                                      self.cfg.optim.decay_steps or self.cfg.steps,
                                      self.cfg.optim.min_lr_ratio)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        examples = 0
        self.backend.reducer.bytes_sent = 0
        batches = iter(micro_batches)
        for i in range(n_micro):
            batch = self._to_device(next(batches, None) or self._empty)
            loss = self._loss(self.model, batch)
            views = self.task.views  # rows per example
            loss_sum += loss.detach().float().sum() / views
            examples += loss.shape[0] // views
            if self.engine is not None:
                self.task.private_backward(self.engine, loss)
            else:
                self.backend.backward(loss.sum() / (self.geo.batch_size * views), last=i == n_micro - 1)
        assert next(batches, None) is None, "the reader yielded more micro-batches than planned"
        stats: dict[str, float] = {}
        if self.engine is not None:
            self.backend.before_assign()
            stats = self.engine.finish_step()
        self.backend.step(lr)
        self.task.after_step(self.backend)
        return {"loss_sum": float(loss_sum), "examples": examples, "lr": lr,
                "clipped": stats.get("clip_fraction", 0.0) * (stats.get("examples", 0)
                                                             - stats.get("skipped_nonfinite", 0)),
                "skipped": stats.get("skipped_nonfinite", 0),
                **{k: v for k, v in stats.items() if k.startswith("norm_")}}

    # ------------------------------------------------------------------ the loop

    def _sync(self, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.dist.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            self._loop()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            if self.lock is not None:  # the last save is written
                self.lock.release()
        summary: dict[str, Any] = {"step": self.step, "steps": cfg.steps,
                                   "stopped_early": self.step < cfg.steps,
                                   "epsilon_rdp": self.epsilon("rdp"),
                                   "epsilon_pld": self.epsilon("pld"),
                                   "delta": self.plan.delta, "sigma": self.plan.sigma,
                                   "q": self.plan.q, "log_dir": str(cfg.log_dir),
                                   "init_privacy": self.init_privacy,
                                   "checkpoint_dir": str(cfg.checkpoint_dir)}
        if not self.stop_requested and self.evaluate_at_end:
            summary.update(self._evaluate())
        self.metrics.close()
        return summary

    def _evaluate(self) -> dict[str, Any]:
        """Collective (every rank evaluates); rank 0 writes TensorBoard and the results file."""
        cfg = self.cfg
        if cfg.is_classifier:
            return self._evaluate_classifier()
        with self.backend.gathered() as model:
            results = evaluate(model, self.tokenizer, self.dist.device, self.eval_section, heldout=self.heldout,
                               folder=self.eval_folder,
                               captions=cfg.metrics.num_captions if cfg.is_captioner else 0,
                               dtype=self.backend.compute_dtype)
        if results.get("captions"):
            self.metrics.text(self.step, "captions", captions_markdown(results["captions"]))
        scalars = {f"eval/{kind}_{task}": r["accuracy"] for kind in ("zero_shot", "probe")
                   for task, r in results.get(kind, {}).items()}
        own = results.get("eval_data", {})
        scalars |= {f"eval/data_zero_shot_{m}": own["zero_shot"][m]["accuracy"]
                    for m in self.eval_section.methods if m in own.get("zero_shot", {})}
        if "linear_probe" in own:
            scalars["eval/data_linear_probe"] = own["linear_probe"]["top1"]
            scalars |= {f"eval/data_{k}_shot": r["mean"] for k, r in own["few_shot"].items()}
        self.metrics.scalars(self.step, scalars)
        if self.dist.is_main:  # beside the TensorBoard scalars
            latest = self.checkpointer.latest()
            results["results_file"] = str(write_results(
                cfg.log_dir / f"eval_step_{self.step:08d}.json", results, step=self.step, model=cfg.model.name,
                checkpoint=str(latest) if latest else None, train_data=cfg.data.shards or cfg.data.source))
        return results

    def _evaluate_classifier(self) -> dict[str, Any]:
        """Top-1 (and top-5) on the class folder's validation images; rank 0 logs and writes them."""
        results = self.task.evaluate(self.backend, self.dist.device, self.step)
        if results is None:
            return {}
        scalars = {f"eval/{k}": results[k] for k in ("top1", "top5") if k in results}
        self.metrics.scalars(self.step, scalars)
        logger.info("step %d: validation %s", self.step,
                    ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in scalars.items()))
        latest = self.checkpointer.latest()
        results["results_file"] = str(write_results(
            self.cfg.log_dir / f"eval_step_{self.step:08d}.json", results, step=self.step, model=self.cfg.model.name,
            checkpoint=str(latest) if latest else None, train_data=self.cfg.data.classes))
        return results

    def _on_signal(self, signum, frame) -> None:
        logger.warning("signal %d: saving at the end of this step, then exiting", signum)
        self.stop_requested = True

    def _loop(self) -> None:
        cfg, m = self.cfg, self.cfg.metrics
        window = {"loss_sum": 0.0, "examples": 0, "clipped": 0.0, "skipped": 0, "steps": 0}
        t0, saved_at = time.perf_counter(), self.step
        while self.step < self.stop_at:
            # one scalar collective per step: the most micro-batches any rank may run (a rank
            # with fewer, or whose reader dropped empty/bad ones, pads with empty micro-batches
            # so every rank runs the same collectives), and whether any rank was signalled
            planned = len(self.sampler.step_batches(self.step))
            n_micro, stop = self._sync([planned, float(self.stop_requested)], dist.ReduceOp.MAX)
            if stop:
                self.stop_requested = True
                break
            out = self.train_step(self.reader.micro_batches(self.step), int(n_micro))
            self.step += 1
            if self.plan.enabled:
                sigma, q, k = self.segments[-1]
                self.segments[-1] = (sigma, q, k + 1)
            for key in ("loss_sum", "examples", "clipped", "skipped"):
                window[key] += out[key]
            window["steps"] += 1
            if self.step % m.log_every == 0 or self.step == self.stop_at:
                self._log(out, window, time.perf_counter() - t0)
                window = dict.fromkeys(window, 0)
                t0 = time.perf_counter()
            if m.caption_every and self.step % m.caption_every == 0 and self.evaluate_at_end and cfg.is_captioner:
                self._captions()
            every = cfg.finetune.eval_every
            if cfg.is_classifier and every and self.step % every == 0 and self.step < self.stop_at:
                self._evaluate()
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save()
                saved_at = self.step
        if self.step != saved_at:
            self.save()

    def _log(self, out: dict[str, float], window: dict[str, float], seconds: float) -> None:
        loss_sum, examples, clipped, skipped = self._sync(
            [window["loss_sum"], window["examples"], window["clipped"], window["skipped"]])
        # rank 0's reader only: its counts are the ones checkpoints keep
        bad_samples = self.reader.skipped
        if bad_samples > self._bad_samples and self.dist.is_main:
            logger.warning("rank 0 has skipped %d undecodable samples so far: %s", bad_samples,
                           dict(getattr(self.reader, "skipped_reasons", {})))
        self._bad_samples = bad_samples
        steps = max(1, window["steps"])
        values = {"train/loss": loss_sum / max(1, examples), "train/lr": out["lr"],
                  "train/examples_per_s": examples / max(seconds, 1e-9),
                  "train/realised_batch": examples / steps,
                  "comm/bytes_per_step": float(self.backend.reducer.bytes_sent),
                  "data/skipped_samples_rank0": float(bad_samples)}
        if self.plan.enabled:
            values.update({"privacy/epsilon_rdp": self.epsilon("rdp"), "privacy/sigma": self.plan.sigma,
                           "privacy/q": self.plan.q,
                           "privacy/clip_fraction": clipped / max(1, examples - skipped),
                           "privacy/skipped_nonfinite": skipped})
            values.update({f"privacy/{k}_rank0": v for k, v in out.items() if k.startswith("norm_")})
            pld_every = self.cfg.metrics.pld_every
            if pld_every and (self.step % pld_every == 0 or self.step == self.stop_at):
                values["privacy/epsilon_pld"] = self.epsilon("pld")
        # the model's training FLOPs at the achieved rate (the engine's own work not counted)
        rate = self.flops_per_example * examples / max(seconds, 1e-9)
        values["train/tflops_per_s"] = rate / 1e12
        if self.dist.device.type == "cuda":
            values["gpu/max_memory_gib"] = torch.cuda.max_memory_allocated(self.dist.device) / 2**30
            if peak := peak_flops(self.dist.device):
                values["gpu/mfu"] = rate / (peak * self.dist.world_size)
        self.metrics.scalars(self.step, values)
        postfix = {"loss": f"{values['train/loss']:.3f}"}
        if self.plan.enabled:
            self._last_pld = values.get("privacy/epsilon_pld", self._last_pld)
            postfix |= {"eps_rdp": f"{values['privacy/epsilon_rdp']:.3f}",
                        "eps_pld": "pending" if self._last_pld is None else f"{self._last_pld:.3f}"}
        else:
            postfix["eps"] = "off (non-private)"
        self.metrics.progress(self.step, postfix)
        self.metrics.flush()

    def _captions(self) -> None:
        """Captions of eval.data's images (or the held-out synthetic ones) into TensorBoard."""
        count, dtype = self.cfg.metrics.num_captions, self.backend.compute_dtype
        if self.eval_folder is None and self.heldout is None:
            return
        with self.backend.gathered() as model:  # collective
            if self.eval_folder is not None:
                captions = folder_captions(model, self.tokenizer, self.dist.device, self.eval_folder, count, dtype)
            else:
                captions = caption_examples(model, self.tokenizer, self.dist.device, self.heldout, count, dtype)
        self.metrics.text(self.step, "captions", captions_markdown(captions))


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config dict as dotted key -> leaf value."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
