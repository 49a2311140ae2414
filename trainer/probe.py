"""Linear-probe and few-shot evaluation of a trained encoder on frozen features.

    python -m trainer.probe CHECKPOINT [--config PRESET|FILE] [--data synthetic:TASK | FOLDER]
        [--shots 1,5,10] [--trials 5] [--pool mean|cls] [--out results.json]

DP-Cap and ViP are judged, as in their papers, by a linear classifier on the
frozen encoder's features: trained on every training example (the full linear
probe) and on k examples per class (k-shot, mean and std over a few draws).
The classifier is an L2-penalised multinomial logistic regression fitted
full-batch with L-BFGS from zeros, so a result depends only on the features
and the seed (trainer.common.probing).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from trainer.common.heldout import HeldOut
from trainer.common.probing import SYNTHETIC, check_shots, folder_data, probe_lines, run_probe, synthetic_data
from trainer.common.weights import (
    add_model_arguments,
    load_trained_model,
    locate,
    pick_device,
    refuse_classifier,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.probe",
        description="Full linear probe and k-shot linear classification on a frozen DP-Cap / ViP encoder.")
    add_model_arguments(parser)
    parser.add_argument("--data", default="synthetic:colour", help="synthetic:colour|shape|object (held-out "
                        "synthetic images, halves for train/test) or FOLDER with train/<class>/ and val/<class>/")
    parser.add_argument("--examples", type=int, default=None,
                        help="synthetic images in all (default: the config's data.heldout_examples)")
    parser.add_argument("--shots", default="1,5,10", help="comma-separated k of the k-shot probes ('' for none)")
    parser.add_argument("--trials", type=int, default=5, help="draws of k examples per class per k")
    parser.add_argument("--pool", choices=("mean", "cls"), default="mean",
                        help="mean over patch tokens, or the CLS token")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the classifier weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of the k-shot draws")
    parser.add_argument("--batch-size", type=int, default=64, help="images per feature-extraction batch")
    parser.add_argument("--out", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def _shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--shots {text!r}: expected comma-separated integers, e.g. 1,5,10") from None
    if any(k < 1 for k in shots):
        raise ValueError(f"--shots {text!r}: every k must be >= 1")
    return shots


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        shots = _shots(args.shots)
        if args.trials < 1 or args.batch_size < 1:
            raise ValueError("--trials and --batch-size must be >= 1")
        device = pick_device(args.device)
        if not args.data.startswith(SYNTHETIC) and not Path(args.data).is_dir():
            raise ValueError(f"--data {args.data}: neither synthetic:TASK nor an existing folder")
        cfg, weights = locate(args.checkpoint, args.config)
        refuse_classifier(cfg, args.checkpoint)
        if args.data.startswith(SYNTHETIC):
            count = args.examples if args.examples is not None else cfg.data.heldout_examples
            data = synthetic_data(HeldOut.of(cfg), args.data[len(SYNTHETIC):], count)
        else:
            data = folder_data(Path(args.data), cfg)
        for k in shots:  # before loading the model and extracting features (the long part)
            check_shots(data.train_labels, k, data.classes)
        model = load_trained_model(cfg, weights).to(device)
        results = run_probe(model, data, shots=shots, trials=args.trials, pool=args.pool,
                            batch_size=args.batch_size, device=device, l2=args.l2, seed=args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = {"checkpoint": args.checkpoint, "model": cfg.model.name, "data": args.data,
               "pool": args.pool, "l2": args.l2, "seed": args.seed, **results}
    print("\n".join(probe_lines(results)))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    if not __package__:  # run as a file, Python would not import trainer/ as the trainer package
        sys.exit("run the probe as a module: python -m trainer.probe ...")
    sys.exit(main())
