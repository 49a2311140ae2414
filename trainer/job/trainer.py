"""The training job: one :class:`Trainer`, built in a fixed order, that resumes by itself.

Order: checks (before any work), distributed, the data's size (from the shards'
index, built first if another tool wrote them) and the privacy plan, model and
what the evaluation will read, ``--init`` weights, the privacy engine on the bare
model, the backend (sharding and optimizer), the reader, checkpointer and resume,
metrics. Everything here is the same for every backend; ``trainer.job.backend``
is the seam.

State: each component owns its own and gives it as ``state_dict`` /
``load_state_dict``; a checkpoint's ``meta.json`` holds one entry per component
(:meth:`Trainer.components`: the train state, the privacy ledger, the privacy
engine, the reader, the metrics), the backend's tensors beside it, and resume
loads them in that order. A resume that is not a plain requeue of the run that
wrote the checkpoint is a new branch (``trainer.job.train_state``).

Ranks agree before they train: rank 0 chooses the checkpoint to resume, every
rank must see it, and after loading every rank's step, secret seeds, N and shard
list are compared (``trainer.job.distributed.agree``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from privacy.seeds import derived_seed, draw_secret_seed
from trainer.common.build import build_model, build_tokenizer
from trainer.common.checkpoints import META_FORMAT, read_meta, step_folder
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
from trainer.job import privacy_plan
from trainer.job import tasks
from trainer.job.backend import create_backend
from trainer.job.checkpointer import Checkpointer
from trainer.job.training_data import InMemoryData, build_reader, count_examples, prepare_shards, sample_captions
from trainer.job.distributed import (
    Distributed,
    agree,
    from_rank0,
    init_distributed,
    launcher_env,
    reduce_floats,
)
from trainer.job.ledger import PrivacyLedger
from trainer.job.metrics import Metrics, MetricsProcessor
from trainer.job.optim import lr_factor
from trainer.job.run_lock import RunLock, releases_lock_on_error
from trainer.job.train_state import TrainState, branch_reasons
from trainer.job.validation import validate, validate_data_size

logger = logging.getLogger(__name__)



class Trainer:
    """One training job. ``model_factory``/``train_data`` replace the defaults
    (models.create_model, the data/ reader: ``trainer.job.training_data.InMemoryData``);
    ``evaluate_at_end`` runs the end-of-job
    evaluation (captions, zero-shot accuracy, probes, as ``cfg.eval`` asks)."""

    @releases_lock_on_error
    def __init__(self, cfg: JobConfig, *, allow_non_private: bool = False,
                 local_rank: int | None = None,
                 model_factory: Callable[[JobConfig, Any], nn.Module] | None = None,
                 train_data: InMemoryData | None = None,
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
            sampling_seed = derived_seed(secret, 1)
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
            self.reader = train_data.reader(self.sampler)
        self._empty = self.task.empty()

        # 7. the state a checkpoint holds, by component (the metrics report the ledger); resume
        self.state = TrainState(cfg, sampling_seed, self.backend.name, self.dist.world_size)
        self.ledger = PrivacyLedger(self.plan, cfg.privacy.allow_privacy_change)
        self.metrics = MetricsProcessor(
            Metrics(cfg.log_dir, enabled=self.dist.is_main, total_steps=cfg.steps, progress=cfg.metrics.progress),
            cfg.metrics, self.dist, self.ledger, self.flops_per_example, self.reader, self.backend.reducer)
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, self.dist.rank, self.lock)
        self.resumed_from = None
        if (latest := self.checkpointer.start(cfg.checkpoint.resume)) is not None:
            self._resume(latest)
        self._check_ranks_agree(index)
        self.stop_at = self.ledger.stop_step(self.step, cfg.steps)
        self.stop_requested = False

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
        found = {"enabled": True, "epsilon_rdp": privacy.get("epsilon_rdp"), "delta": privacy.get("delta")}
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
        seed = torch.tensor([draw_secret_seed()], dtype=torch.int64, device=self.dist.device)
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

    def _check_ranks_agree(self, index) -> None:
        """Before training: every rank resumed the same step with the same secret seeds (compared
        as hashes: the seeds stay out of every message), the same N and the same shard list."""
        def hashed(value: Any) -> str:
            return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]

        shards = ([[str(p), int(c)] for p, c in zip(index.paths, index.counts)] if index is not None
                  else self.cfg.data.num_examples)  # in memory: N, checked against the data above
        noise_seed = self.engine.state_dict()["seed"] if self.engine is not None else None
        agree({"step": self.step, "noise seed (hash)": hashed(noise_seed),
               "sampling seed (hash)": hashed(self.sampler.seed), "data.num_examples": self.cfg.data.num_examples,
               "shard list and counts (hash)": hashed(shards)}, "the run they start")

    def _branch(self, path: Path, meta: dict[str, Any]) -> None:
        """A plain requeue keeps the checkpoint's lineage and seeds (bit-identical to an
        uninterrupted run); any other continuation is a new branch whose secret seeds get a
        fresh salt, so that no two continuations of one checkpoint share noise or batches."""
        # rank 0's view decides for all
        reasons, salt = from_rank0((branch_reasons(self.cfg, meta), draw_secret_seed()))
        if not reasons:
            return
        if not self.plan.enabled:  # nothing secret to salt: the sampling seed is the config's
            self.state.branch(reasons, None, str(path))
            return
        engine_state = self.engine.state_dict()
        self.engine.load_state_dict({**engine_state, "seed": derived_seed(engine_state["seed"], salt)})
        self.state.sampling_seed = derived_seed(self.state.sampling_seed, salt)
        self.state.branch(reasons, salt, str(path))
        if self.dist.is_main:
            logger.warning("resuming %s as a new branch (%s): a fresh secret salt is mixed into the noise and "
                           "sampling seeds, so this continuation never reuses the noise of another one from "
                           "the same checkpoint", path, "; ".join(reasons))

    # ------------------------------------------------------------------ state

    @property
    def step(self) -> int:
        return self.state.step

    def components(self) -> dict[str, Any]:
        """What a checkpoint holds besides the backend's tensors, by its key in ``meta.json``,
        in the order a resume loads them (None: not in this run)."""
        return {"train_state": self.state, "privacy": self.ledger, "engine": self.engine,
                "reader": self.reader, "metrics": self.metrics}

    def _resume(self, path: Path) -> None:
        meta = read_meta(path)
        saved = meta["train_state"]
        try:
            if saved["backend"] != self.backend.name:
                raise ValueError(f"it was written by backend={saved['backend']}; resume with "
                                 f"backend={saved['backend']}, or start a new checkpoint.dir from its weights "
                                 f"with --init {path}")
            self.backend.check_resume(saved["world_size"])
            for key, component in self.components().items():
                if component is None:
                    continue
                if meta.get(key) is None:
                    raise ValueError(f"its meta.json has no {key!r} entry, which this run needs to resume (a "
                                     f"checkpoint not written by a training job?); start a new checkpoint.dir "
                                     f"from its weights with --init {path}")
                component.load_state_dict(meta[key])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        Checkpointer.load(path, self.backend)
        self._branch(path, meta)
        self.sampler.seed = self.state.sampling_seed  # the run's secret one (a fresh one was drawn above)
        self.resumed_from = str(path)
        logger.info("resumed from %s at step %d", path, self.step)

    def epsilon(self, method: str = "rdp") -> float:
        return self.ledger.epsilon(method)

    def save(self) -> None:
        meta = {key: None if component is None else component.state_dict()
                for key, component in self.components().items()}
        # every rank's reader position is the step (the state is rank 0's)
        meta["reader"]["next_step"] = self.step
        meta |= {"format": META_FORMAT, "config": self.cfg.to_dict()}
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
        torch.manual_seed(derived_seed(self.cfg.seed, self.step, self.dist.rank))
        lr = self.peak_lr * lr_factor(self.step, self.cfg.optim.warmup_steps,
                                      self.cfg.optim.decay_steps or self.cfg.steps,
                                      self.cfg.optim.min_lr_ratio)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.dist.device)
        examples = 0
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
        self.metrics.writer.close()
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
            self.metrics.writer.text(self.step, "captions", captions_markdown(results["captions"]))
        scalars = {f"eval/{kind}_{task}": r["accuracy"] for kind in ("zero_shot", "probe")
                   for task, r in results.get(kind, {}).items()}
        own = results.get("eval_data", {})
        scalars |= {f"eval/data_zero_shot_{m}": own["zero_shot"][m]["accuracy"]
                    for m in self.eval_section.methods if m in own.get("zero_shot", {})}
        if "linear_probe" in own:
            scalars["eval/data_linear_probe"] = own["linear_probe"]["top1"]
            scalars |= {f"eval/data_{k}_shot": r["mean"] for k, r in own["few_shot"].items()}
        self.metrics.writer.scalars(self.step, scalars)
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
        self.metrics.writer.scalars(self.step, scalars)
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
        self.metrics.writer.open_progress(self.step)
        self.metrics.start_window()
        saved_at = self.step
        while self.step < self.stop_at:
            # one scalar collective per step: the most micro-batches any rank may run (a rank
            # with fewer, or whose reader dropped empty/bad ones, pads with empty micro-batches
            # so every rank runs the same collectives), and whether any rank was signalled
            planned = len(self.sampler.step_batches(self.step))
            n_micro, stop = reduce_floats([planned, float(self.stop_requested)], self.dist.device, dist.ReduceOp.MAX)
            if stop:
                self.stop_requested = True
                break
            out = self.train_step(self.reader.micro_batches(self.step), int(n_micro))
            self.state.step += 1
            self.ledger.record_step()
            self.metrics.record(self.step, out, last=self.step == self.stop_at)
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
        self.metrics.writer.text(self.step, "captions", captions_markdown(captions))
