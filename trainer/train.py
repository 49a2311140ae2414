"""Entry point: ``python -m trainer.train --config NAME_OR_FILE [key=value ...]``.

The :class:`Trainer` is built in a fixed order: distributed, model,
parallelize, optimizer, lr schedule, privacy engine, data, checkpointer,
metrics. It resumes from the latest checkpoint of its folder by itself.
"""

from __future__ import annotations

import argparse
import logging
import math
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from privacy import accounting
from trainer import plan as privacy_plan
from trainer.checkpoint import Checkpointer, ModelOptimizerState, load_model_weights
from trainer.config import JobConfig, learning_rate, load_config, validate
from trainer.data import InMemoryReader
from trainer.distributed import Distributed, exit_process, init_distributed, launcher_env, shutdown
from trainer.metrics import Metrics, peak_flops
from trainer.optim import build_optimizer, lr_factor
from trainer.parallelize import parallelize
from trainer.reducer import FSDPGradReducer

logger = logging.getLogger(__name__)


def build_tokenizer(cfg: JobConfig):
    """DP-Cap's tokenizer: BERT WordPiece, restricted to the synthetic captions' words
    when training on synthetic data; None for ViP."""
    if not cfg.is_captioner:
        return None
    if cfg.data.source == "synthetic":
        from trainer.datasets import synthetic_tokenizer

        return synthetic_tokenizer(cfg.data.seed)
    from models.tokenizer import load_tokenizer

    return load_tokenizer()


def build_model(cfg: JobConfig, tokenizer) -> nn.Module:
    import models

    overrides = dict(cfg.model.overrides)
    if tokenizer is not None:
        if overrides.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ValueError(f"model.overrides.vocab_size={overrides['vocab_size']} but the tokenizer "
                             f"has {tokenizer.vocab_size} ids; drop the override")
        overrides["vocab_size"] = tokenizer.vocab_size
    if cfg.is_captioner:
        overrides.setdefault("text_max_length", cfg.data.text_length)
    return models.create_model(cfg.model.name, **overrides)


def _step_seed(*words: int) -> int:
    return int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0]) & (2**63 - 1)


class Trainer:
    """One training job. ``model_factory``/``train_data``/``eval_fn`` replace the
    defaults (models.create_model, the data/ reader, zero-shot evaluation)."""

    def __init__(self, cfg: JobConfig, *, allow_non_private: bool = False,
                 local_rank: int | None = None,
                 model_factory: Callable[[JobConfig, Any], nn.Module] | None = None,
                 train_data: Sequence | None = None,
                 eval_fn: Callable[[Trainer], dict[str, Any]] | None = None):
        self.cfg = cfg
        # every check that needs neither data nor models, before any work
        _, _, world = launcher_env(local_rank)
        self.geo = validate(cfg, world, allow_non_private)
        self.plan = privacy_plan.resolve(cfg, self.geo)

        # 1. distributed
        self.dist: Distributed = init_distributed(local_rank)
        device = self.dist.device
        self.bf16 = self.geo.bf16  # honoured on CPU too (slow there; the CPU presets leave it off)
        self.compute_dtype = torch.bfloat16 if self.bf16 else torch.float32

        # 2. model (same init on every rank), 3. parallelize
        torch.manual_seed(cfg.seed)
        self.tokenizer = build_tokenizer(cfg)
        model = (model_factory or build_model)(cfg, self.tokenizer).to(device)
        self.flops_per_example = self._count_flops(model)
        self.model = parallelize(model, self.dist.mesh, bf16=self.bf16)
        if cfg.init:
            import models

            try:
                load_model_weights(self.model, cfg.init, partial(models.from_original_layout, self.model))
            except ValueError as e:
                raise ValueError(f"--init {e}") from None

        # 4. optimizer, 5. lr schedule (stateless: a function of the step)
        self.optimizer = build_optimizer(self.model, cfg, device)
        self.peak_lr = learning_rate(cfg)

        # 6. privacy engine; one secret seed (never from the config) shared by all ranks
        # seeds the noise (each rank on its own stream) and the Poisson sampling
        self.reducer = FSDPGradReducer(self.dist.mesh, noise_stream=self.dist.rank)
        self.engine = None
        if self.plan.enabled:
            from privacy import PrivacyEngine

            secret = self._shared_secret_seed()
            self.engine = PrivacyEngine(self.model, max_grad_norm=self.plan.max_grad_norm,
                                        noise_multiplier=self.plan.sigma,
                                        expected_batch_size=self.geo.batch_size,
                                        seed=secret, reducer=self.reducer)
            sampling_seed = _step_seed(secret, 1)
        else:
            sampling_seed = cfg.seed

        # 7. data: the Poisson sampler (same seed on every rank) decides each step's examples
        from privacy.sampling import PoissonSampler

        if train_data is None:
            from trainer.datasets import build_reader, count_examples, prepare_shards

            index = prepare_shards(cfg, self.dist)
            num_examples = count_examples(index)
        else:
            num_examples = len(train_data)
        if num_examples != cfg.data.num_examples:
            raise ValueError(f"data.num_examples={cfg.data.num_examples} but the data set has "
                             f"{num_examples} examples; set data.num_examples={num_examples}")
        self.sampler = PoissonSampler(num_examples, self.plan.q, sampling_seed,
                                      world_size=self.dist.world_size, rank=self.dist.rank,
                                      max_physical_batch=self.geo.micro_batch)
        if train_data is None:
            self.reader = build_reader(cfg, index, self.sampler, self.tokenizer,
                                       pin_memory=device.type == "cuda")
        else:
            self.reader = InMemoryReader(train_data, self.sampler)
        size = cfg.model.overrides.get("img_size", 224)
        self._empty = (torch.empty(0, 3, size, size), torch.zeros(0, cfg.data.text_length, dtype=torch.long))
        self.eval_fn = eval_fn

        # 8. checkpointer; resume
        self.checkpointer = Checkpointer(cfg.checkpoint_dir, cfg.checkpoint.keep_last, self.dist.rank)
        self.step = 0
        self.segments: list[accounting.Segment] = [self.plan.segment(0)]
        self.resumed_from = None
        if cfg.checkpoint.resume and (latest := self.checkpointer.latest()) is not None:
            self._resume(latest)
        self.stop_at = self._privacy_stop()

        # 9. metrics
        self.metrics = Metrics(cfg.log_dir, enabled=self.dist.is_main, total_steps=cfg.steps,
                               start_step=self.step, progress=cfg.metrics.progress)
        self.stop_requested = False
        self._last_pld: float | None = None  # shown by the progress bar between PLD evaluations
        self._bad_samples = self.reader.skipped  # undecodable samples rank 0's reader skipped so far

    # ------------------------------------------------------------------ set-up helpers

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

        size = self.cfg.model.overrides.get("img_size", 224)
        # shapes are fixed, so the count does not depend on the ids; 1 is in every vocabulary
        tokens = torch.ones(1, self.cfg.data.text_length, dtype=torch.long, device=self.dist.device)
        sample = (torch.zeros(1, 3, size, size, device=self.dist.device), tokens)
        with FlopCounterMode(display=False) as counter:
            self._loss(model, sample).sum().backward()
        model.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())

    def _privacy_state(self) -> dict[str, Any]:
        return {"segments": [list(s) for s in self.segments], "delta": self.plan.delta,
                "max_grad_norm": self.plan.max_grad_norm, "enabled": self.plan.enabled}

    def _resume(self, path) -> None:
        meta = Checkpointer.read_meta(path)
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
        Checkpointer.load(path, ModelOptimizerState(self.model, self.optimizer))
        if self.engine is not None:
            self.engine.load_state_dict(meta["engine"])
        # the secret sampling seed of the run being resumed (a fresh one was drawn above)
        self.sampler.seed = int(meta["sampling_seed"])
        self.step = int(meta["step"])
        self.reader.load_state_dict({**meta["reader"], "next_step": self.step})
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
                "sampling_seed": self.sampler.seed,
                "world_size": self.dist.world_size, "config": self.cfg.to_dict(),
                "reader": self.reader.state_dict(),  # rank 0's; every rank's position is the step
                "epsilon_rdp": self.epsilon("rdp") if self.plan.enabled else None}
        self.checkpointer.save(self.step, ModelOptimizerState(self.model, self.optimizer), meta)

    # ------------------------------------------------------------------ the step

    def _loss(self, model: nn.Module, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.cfg.is_captioner:
            images, tokens = batch[0], batch[1]
            return model(images, tokens)
        return model(batch[0], mask_ratio=self.cfg.model.mask_ratio)

    def train_step(self, micro_batches: Iterable[tuple[torch.Tensor, ...]], n_micro: int) -> dict[str, float]:
        """One logical step: this rank's micro-batches, padded with empty ones to
        `n_micro` (the same on every rank), then the noised update."""
        device = self.dist.device
        # same RNG on every rank and step (ViP masking); resume-exact
        torch.manual_seed(_step_seed(self.cfg.seed, self.step, self.dist.rank))
        lr = self.peak_lr * lr_factor(self.step, self.cfg.optim.warmup_steps,
                                      self.cfg.optim.decay_steps or self.cfg.steps,
                                      self.cfg.optim.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), dtype=torch.float32, device=device)
        examples = 0
        self.reducer.bytes_sent = 0
        batches = iter(micro_batches)
        for i in range(n_micro):
            batch = next(batches, None) or self._empty
            batch = tuple(x.to(device, non_blocking=True) for x in batch)
            loss = self._loss(self.model, batch)
            loss_sum += loss.detach().float().sum()
            examples += loss.shape[0]
            if self.engine is not None:
                self.engine.backward(loss)
            else:
                # FSDP averages over ranks; its reduce-scatter runs once, on the last micro-batch
                self.model.set_requires_gradient_sync(i == n_micro - 1)
                (loss.sum() * (self.dist.world_size / self.geo.batch_size)).backward()
        assert next(batches, None) is None, "the reader yielded more micro-batches than planned"
        stats: dict[str, float] = {}
        if self.engine is not None:
            stats = self.engine.finish_step()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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
        summary: dict[str, Any] = {"step": self.step, "steps": cfg.steps,
                                   "stopped_early": self.step < cfg.steps,
                                   "epsilon_rdp": self.epsilon("rdp"),
                                   "epsilon_pld": self.epsilon("pld"),
                                   "delta": self.plan.delta, "sigma": self.plan.sigma,
                                   "q": self.plan.q, "log_dir": str(cfg.log_dir),
                                   "checkpoint_dir": str(cfg.checkpoint_dir)}
        if not self.stop_requested and self.eval_fn is not None:
            results = self.eval_fn(self)
            self.metrics.scalars(self.step, {f"eval/{kind}_{task}": r["accuracy"]
                                             for kind in ("zero_shot", "probe")
                                             for task, r in results.get(kind, {}).items()})
            summary.update(results)
        self.metrics.close()
        return summary

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
            # so every rank runs the same FSDP collectives), and whether any rank was signalled
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
            if (m.caption_every and self.step % m.caption_every == 0 and self.eval_fn is not None
                    and cfg.is_captioner):
                self._captions()
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
                  "comm/bytes_per_step": float(self.reducer.bytes_sent),
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
        from trainer.evaluate import caption_examples

        text = caption_examples(self)
        self.metrics.text(self.step, "captions", text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description="Differentially private training of DP-Cap / ViP (FSDP2, book-keeping clipping).")
    parser.add_argument("--config", required=True,
                        help="preset name (e.g. default, dpcap_base_paper, vip_stage2) or a .json/.yaml file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. privacy.target_epsilon=4")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (geometry, sigma, "
                        "epsilon along the way, TAN options) and exit")
    parser.add_argument("--init", default=None, help="initial weights only (our checkpoint folder "
                        "or an original-layout DP-Cap .pth)")
    parser.add_argument("--allow-non-private", action="store_true",
                        help="confirm privacy.enabled=false (no privacy guarantee)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run only: plan for this many ranks")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.init:
            cfg.init = args.init
        if args.dry_run:
            world = args.world_size or launcher_env(args.local_rank)[2]
            geo = validate(cfg, world, args.allow_non_private)
            print(privacy_plan.format_plan(cfg, geo, privacy_plan.resolve(cfg, geo)))
            return 0
        if args.world_size is not None:
            raise ValueError("--world-size is for --dry-run; the launcher sets the world size")
        eval_fn = None
        if cfg.eval.zero_shot or cfg.eval.probe or cfg.is_captioner:
            from trainer.evaluate import evaluate

            eval_fn = evaluate
        trainer = Trainer(cfg, allow_non_private=args.allow_non_private,
                          local_rank=args.local_rank, eval_fn=eval_fn)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = trainer.train()
    if trainer.dist.is_main:
        print(_summary_text(summary))
    shutdown()
    exit_process(0)


def _summary_text(s: dict[str, Any]) -> str:
    lines = [f"trained {s['step']}/{s['steps']} steps" + (" (stopped early)" if s["stopped_early"] else "")]
    if math.isfinite(s["epsilon_rdp"]):
        lines.append(f"privacy: epsilon = {s['epsilon_rdp']:.3f} (RDP), {s['epsilon_pld']:.3f} (PLD) "
                     f"at delta = {s['delta']:.3g}; sigma = {s['sigma']:.4g}, q = {s['q']:.4g}")
    else:
        lines.append("privacy: NONE (non-private run)")
    for task, r in s.get("zero_shot", {}).items():
        lines.append(f"zero-shot {task}: accuracy {r['accuracy']:.3f} ({r['classes']} classes, "
                     f"chance {1 / r['classes']:.3f}; {s['eval_examples']} held-out images)")
    for task, r in s.get("probe", {}).items():
        lines.append(f"linear probe {task}: top-1 {r['accuracy']:.3f} ({r['classes']} classes, chance "
                     f"{1 / r['classes']:.3f}; {r['train']} train / {r['test']} test held-out images)")
    lines.append(f"TensorBoard logs: {s['log_dir']}  (tensorboard --logdir {s['log_dir']})")
    lines.append(f"checkpoints: {s['checkpoint_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if not __package__:  # run as a file, trainer/ would shadow the top-level packages (data.py)
        sys.exit("run the trainer as a module: python -m trainer.train ... "
                 "(deepspeed --module trainer.train ..., torchrun -m trainer.train ...)")
    sys.exit(main())
