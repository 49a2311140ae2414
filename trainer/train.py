"""Entry point: ``python -m trainer.train --config NAME_OR_FILE [key=value ...] [options]``.

Options and ``key=value`` overrides may come in any order. The job itself is
``trainer.job.trainer.Trainer``; this module parses, reports and exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

from trainer.common.config import load_config
from trainer.common.evaluation import summary_lines
from trainer.job import privacy_plan
from trainer.job.training_data import count_examples, prepare_shards
from trainer.job.distributed import exit_process, launcher_env, shutdown
from trainer.job.tasks import Classification
from trainer.job.trainer import Trainer
from trainer.job.validation import validate, validate_data_size

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.train",
        description="Differentially private training of DP-Cap / ViP (FSDP2 or DeepSpeed ZeRO, "
                    "book-keeping clipping).")
    parser.add_argument("--config", required=True,
                        help="preset name (e.g. default, dpcap_base_paper, vip_stage2) or a .json/.yaml file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. privacy.target_epsilon=4 "
                        "backend=deepspeed ds.zero_optimization.stage=2")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (geometry, sigma, "
                        "epsilon along the way, TAN options) and exit")
    parser.add_argument("--init", default=None, help="initial weights only: our checkpoint folder, or "
                        "a .pt/.pth or .safetensors file (ours, or the original DP-Cap / MAE layout)")
    parser.add_argument("--allow-non-private", action="store_true",
                        help="confirm privacy.enabled=false (no privacy guarantee)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="--dry-run only: plan for this many ranks")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    # positionals after an option: plain parse_args stops collecting them at the first option
    return parser.parse_intermixed_args(argv)


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
            if cfg.data.num_examples == 0 and cfg.is_classifier:  # the folder's readable training images
                cfg.data.num_examples = len(Classification(cfg).train)
                logger.info("data.num_examples not set: N = %s, the readable training images of data.classes",
                            f"{cfg.data.num_examples:,}")
                validate_data_size(cfg, geo)
            elif cfg.data.num_examples == 0:  # left out: the shards' index says (built now if need be)
                cfg.data.num_examples = count_examples(prepare_shards(cfg, None))
                logger.info("data.num_examples not set: N = %s, the number of samples the index of "
                            "data.shards lists", f"{cfg.data.num_examples:,}")
                validate_data_size(cfg, geo)
            print(privacy_plan.format_plan(cfg, geo, privacy_plan.resolve(cfg, geo)))
            return 0
        if args.world_size is not None:
            raise ValueError("--world-size is for --dry-run; the launcher sets the world size")
        trainer = Trainer(cfg, allow_non_private=args.allow_non_private, local_rank=args.local_rank,
                          evaluate_at_end=cfg.eval.zero_shot or cfg.eval.probe or cfg.is_captioner
                          or cfg.is_classifier)
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
    init = s.get("init_privacy")
    if init and init["enabled"]:
        lines.append(f"--init weights: trained privately to epsilon = {init['epsilon_rdp']:.3f} (RDP) at delta = "
                     f"{init['delta']:.3g} on their own data; the model's total privacy cost composes that "
                     f"with this run's epsilon")
    lines += summary_lines(s)
    if "results_file" in s:
        lines.append(f"evaluation results: {s['results_file']}")
    lines.append(f"TensorBoard logs: {s['log_dir']}  (tensorboard --logdir {s['log_dir']})")
    lines.append(f"checkpoints: {s['checkpoint_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if not __package__:  # run as a file, Python would not import trainer/ as the trainer package
        sys.exit("run the trainer as a module: python -m trainer.train ... "
                 "(deepspeed --module trainer.train ..., torchrun -m trainer.train ...)")
    sys.exit(main())
