"""Evaluate a trained model on a folder of your classes, as the training job does at its end.

    python -m trainer.evaluate CHECKPOINT --data FOLDER [--config PRESET|FILE] [--prompt TEXT]
        [--methods trie,loss] [--shots 1,5,10] [--trials 5] [--captions 4] [--out results.json]

FOLDER holds class folders: ``FOLDER/train/<class>/`` and ``FOLDER/val/<class>/``
(ImageNet's layout), or ``FOLDER/<class>/``, each class split into val and train
by a hash of the file names (``--val-fraction``). The folder names are the
labels. A DP-Cap gets zero-shot accuracy on the val images (each ``--methods``:
"trie" decoding restricted to the labels, "loss" the caption loss of every
label) and captions of a few of them; either model gets the full linear probe
and the k-shot probes of its frozen encoder (trainer.common.probing). The
results are the JSON file the job writes beside its TensorBoard scalars
(``eval_step_N.json``), here in the current folder unless ``--out`` says where.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.common.build import build_tokenizer
from trainer.common.checkpoints import read_meta
from trainer.common.config import EvalConfig
from trainer.common.evaluation import METHODS, evaluate, folder_plan, summary_lines, write_results
from trainer.common.probing import folder_data
from trainer.common.weights import (
    add_model_arguments,
    load_trained_model,
    locate,
    pick_device,
    refuse_classifier,
)

DEFAULTS = EvalConfig()
logger = logging.getLogger("trainer.evaluate")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Zero-shot accuracy, captions, linear and k-shot probes of a DP-Cap / ViP on a folder "
                    "of classes; the JSON results file of the training job's end-of-job evaluation.")
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="FOLDER/train/<class>/ and FOLDER/val/<class>/, or "
                        "FOLDER/<class>/ (split by --val-fraction)")
    parser.add_argument("--prompt", default=None, help=f"zero-shot: the text before the label (default "
                        f"{DEFAULTS.prompt!r})")
    parser.add_argument("--methods", default=None, help=f"zero-shot scoring, comma-separated ({', '.join(METHODS)}; "
                        f"'' for none; default {','.join(DEFAULTS.methods)})")
    parser.add_argument("--shots", default=None, help="comma-separated k of the k-shot probes ('' for none; "
                        f"default {','.join(map(str, DEFAULTS.shots))}, those that every class has enough "
                        "training images for)")
    parser.add_argument("--trials", type=int, default=DEFAULTS.trials, help="draws of k examples per class per k")
    parser.add_argument("--captions", type=int, default=4, help="val images to caption (DP-Cap)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULTS.val_fraction,
                        help="FOLDER/<class>/ layout: each class's share of images held out to test")
    parser.add_argument("--max-per-class", type=int, default=0, help="> 0: at most this many images of a "
                        "class in each split")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="images per batch")
    parser.add_argument("--out", default=None, help="the JSON results file (default: eval_step_N.json here)")
    return parser.parse_args(argv)


def _numbers(text: str, what: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{what} {text!r}: expected comma-separated integers, e.g. 1,5,10") from None
    if any(k < 1 for k in values):
        raise ValueError(f"{what} {text!r}: every k must be >= 1")
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        methods = DEFAULTS.methods if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
        shots = DEFAULTS.shots if args.shots is None else _numbers(args.shots, "--shots")
        if args.trials < 1 or args.batch_size < 1 or args.captions < 0:
            raise ValueError("--trials and --batch-size must be >= 1, --captions >= 0")
        device = pick_device(args.device)
        cfg, weights = locate(args.checkpoint, args.config)
        refuse_classifier(cfg, args.checkpoint)
        data = folder_data(Path(args.data), cfg, args.val_fraction, args.max_per_class)
        tokenizer = build_tokenizer(cfg)
        asked = dataclasses.replace(DEFAULTS, data=args.data, prompt=args.prompt or DEFAULTS.prompt, methods=methods,
                                    shots=shots, trials=args.trials,
                                    batch_size=args.batch_size, zero_shot=cfg.is_captioner and bool(methods),
                                    val_fraction=args.val_fraction, max_per_class=args.max_per_class)
        section, notes = folder_plan(asked, data, tokenizer, cfg.data.text_length, cfg.is_captioner, "--shots")
        # what was asked for explicitly and cannot run is refused before the (long) evaluation;
        # the defaults that cannot run are skipped, as the job skips them
        asked_for = [n for n in notes if (args.shots is not None and "-shot probe" in n)
                     or ((args.methods, args.prompt) != (None, None) and n.startswith("zero-shot"))]
        if asked_for:
            raise ValueError("; ".join(asked_for) + " (--methods '' skips zero-shot, --shots sets the k)")
        for note in notes:
            logger.warning("%s", note)
        model = load_trained_model(cfg, weights).to(device)
        results = evaluate(model, tokenizer, device, section, folder=data,
                           captions=args.captions if cfg.is_captioner else 0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    step = read_meta(weights)["train_state"].get("step") if weights.is_dir() else None
    out = Path(args.out or (f"eval_step_{step:08d}.json" if step is not None else f"eval_{weights.stem}.json"))
    write_results(out, results, step=step, model=cfg.model.name, checkpoint=str(weights))
    lines = summary_lines(results)
    lines += [f"caption of {c['image']}: {c['caption']}" for c in results.get("captions", [])]
    print("\n".join(lines + [f"evaluation results: {out}"]))
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file, Python would not import trainer/ as the trainer package
        sys.exit("run it as a module: python -m trainer.evaluate ...")
    sys.exit(main())
