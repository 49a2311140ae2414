"""Empirical privacy audit of a DP engine, as one command.

    python -m privacy.audit --out runs/audit                      # privacy.PrivacyEngine, epsilon 2
    python -m privacy.audit --engine mypkg.dp:MyEngine --epsilon 1 --out runs/audit_mine
    python -m privacy.audit --sample-rate 1 --epsilons '' --out runs/audit_q1   # no subsampling
    python -m privacy.audit --device cuda --canaries 100000 --runs 4000 --out runs/audit_big

Trains tiny models with the engine under test (its backward, finish_step and
an SGD optimizer over Poisson-sampled micro-batches, on simulated ranks) with
canaries, and turns the canaries' attack scores into statistical lower bounds
on epsilon, next to the accountant's epsilon for the same (sigma, q, steps,
delta). Writes OUT/audit.json, OUT/audit.png (audited vs claimed over a sweep
of claims) and prints a table. A lower bound above the claimed epsilon means
the engine is NOT as private as claimed (at the stated confidence); a bound
below it proves nothing more than that this audit found no violation.
"""

import argparse
import importlib
import json
import logging
import sys
import time
from pathlib import Path

import torch

from privacy import accounting
from privacy.audit.canaries import CANARY_KINDS
from privacy.audit.report import plot, sweep_table, table
from privacy.audit.runner import Plan, audit_point, verdict
from privacy.audit.training import Mechanism

logger = logging.getLogger("privacy.audit")
DEFAULT_ENGINE = "privacy.engine:PrivacyEngine"
DEFAULT_SAMPLER = "privacy.sampling:PoissonSampler"
ENGINE_METHODS = ("backward", "finish_step", "zero_grad")


def _load(spec: str, flag: str, example: str):
    """``MODULE:NAME`` -> the callable it names."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"{flag} {spec!r}: expected MODULE:NAME, e.g. {example}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{flag} {spec}: cannot import {module_name} ({error}); run from the folder that "
                         "holds it or add that folder to PYTHONPATH") from error
    found = getattr(module, name, None)
    if not callable(found):
        raise ValueError(f"{flag} {spec}: {module_name} has no callable {name}")
    return found


def load_sampler(spec: str):
    """``MODULE:NAME`` -> a batch sampler with PoissonSampler's constructor and methods."""
    return _load(spec, "--sampler", DEFAULT_SAMPLER)


def load_engine(spec: str):
    """``MODULE:NAME`` -> the engine class (or factory) it names."""
    engine = _load(spec, "--engine", DEFAULT_ENGINE)
    name = spec.partition(":")[2]
    if isinstance(engine, type):
        missing = [m for m in ENGINE_METHODS if not callable(getattr(engine, m, None))]
        if missing:
            raise ValueError(f"--engine {spec}: {name} lacks {missing}; an audited engine needs "
                             f"privacy.PrivacyEngine's constructor and methods ({', '.join(ENGINE_METHODS)})")
    return engine


def _numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise ValueError(f"{flag} {text!r}: expected comma-separated numbers") from error


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m privacy.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default=DEFAULT_ENGINE,
                        help="MODULE:NAME of an engine with privacy.PrivacyEngine's constructor and methods")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER,
                        help="MODULE:NAME of the batch sampler under test, with privacy.sampling.PoissonSampler's "
                             "constructor and methods")
    parser.add_argument("--epsilon", type=float, default=2.0,
                        help="claimed epsilon: sigma is calibrated to it (privacy.accounting.calibrate_noise). "
                             "The assumption-free lines are blind above their 'ceiling' column (about 5 with "
                             "10^4 canaries, 3 with 400 runs); the tight line is not")
    parser.add_argument("--out", required=True, type=Path, help="folder for audit.json and audit.png")
    parser.add_argument("--delta", type=float, default=1e-6,
                        help="delta of the claim; the one-run bound pays 2 * canaries * delta")
    parser.add_argument("--accountant", choices=accounting.METHODS, default="pld")
    parser.add_argument("--sample-rate", type=float, default=0.3, help="Poisson rate q of every example")
    parser.add_argument("--steps", type=int, default=10, help="DP-SGD steps of every audited run")
    parser.add_argument("--canaries", type=int, default=10000,
                        help="canaries of each one-run audit (10^5 takes about a minute per run on one core)")
    parser.add_argument("--runs", type=int, default=400, help="runs of each many-runs audit (half with the canary)")
    parser.add_argument("--population", type=int, default=100, help="ordinary examples in every training set")
    parser.add_argument("--micro-batch", type=int, default=32, help="largest micro-batch per rank")
    parser.add_argument("--world-size", type=int, default=2,
                        help="simulated ranks (threads reducing through a sharded reducer); 1 for one process")
    parser.add_argument("--epsilons", default="1,4,8",
                        help="claimed epsilons of the sweep plotted with the --epsilon point, sigma calibrated "
                             "to each ('' for none)")
    parser.add_argument("--sigmas", default="",
                        help="noise multipliers added to the sweep ('' for none)")
    parser.add_argument("--kinds", default=",".join(CANARY_KINDS), help=f"canary kinds ({', '.join(CANARY_KINDS)})")
    parser.add_argument("--confidence", type=float, default=0.999,
                        help="confidence of the verdict of each audit point (split over its rigorous bounds): "
                             "a correct engine is flagged with probability at most 1 - confidence per point, so "
                             "20 audits at 0.999 flag none with probability >= 0.98")
    parser.add_argument("--seed", type=int, default=0, help="seed of canaries, memberships and every run's seeds")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(argv)


def _point(engine, sampler, mechanism: Mechanism, plan: Plan, device: torch.device) -> dict:
    start = time.perf_counter()
    audits = audit_point(engine, mechanism, plan, device, sampler)
    for entry in audits:
        if entry["rigorous"] and entry["epsilon_ceiling"] <= entry["epsilon_claimed"]:
            logger.warning("%s %s can certify at most epsilon %.2f with these counts, so it cannot detect a "
                           "violation of the claimed %.2f: lower --epsilon or raise --canaries / --runs",
                           entry["canary"], entry["estimator"], entry["epsilon_ceiling"], entry["epsilon_claimed"])
    return {"sigma": mechanism.noise_multiplier, "epsilon_claimed": audits[0]["epsilon_claimed"],
            "violation": verdict(audits), "seconds": time.perf_counter() - start, "audits": audits}


def run(args: argparse.Namespace) -> dict:
    engine = load_engine(args.engine)
    sampler = load_sampler(args.sampler)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    plan = Plan(canaries=args.canaries, runs=args.runs, population=args.population, confidence=args.confidence,
                delta=args.delta, accountant=args.accountant, kinds=kinds, seed=args.seed)
    sigmas = _numbers(args.sigmas, "--sigmas")
    epsilons = _numbers(args.epsilons, "--epsilons")
    if not all(eps > 0 for eps in [args.epsilon, *epsilons]):
        raise ValueError(f"--epsilon and --epsilons must be > 0, got {args.epsilon} and {epsilons}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        raise ValueError(f"--device {args.device!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")

    def mechanism(sigma: float) -> Mechanism:
        return Mechanism(sigma, args.sample_rate, args.steps, micro_batch=args.micro_batch,
                         world_size=args.world_size)

    mechanism(0.0)  # refuse bad --sample-rate, --steps, --micro-batch, --world-size before calibrating
    start = time.perf_counter()

    def calibrated(eps: float) -> float:
        return accounting.calibrate_noise(eps, args.delta, args.sample_rate, args.steps, args.accountant)

    sigma = calibrated(args.epsilon)
    logger.info("auditing %s: sigma %.4f calibrated to epsilon %g at delta %g (q %g, %d steps, %s)",
                args.engine, sigma, args.epsilon, args.delta, args.sample_rate, args.steps, args.accountant)
    main = _point(engine, sampler, mechanism(sigma), plan, device)
    sweep = [main]
    for extra in [calibrated(eps) for eps in epsilons] + sigmas:
        logger.info("sweep: sigma %g", extra)
        sweep.append(_point(engine, sampler, mechanism(extra), plan, device))
    sweep.sort(key=lambda p: p["sigma"])
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"engine": args.engine, "confidence": args.confidence, "violation": main["violation"],
            "audits": main["audits"], "sweep": sweep, "settings": settings, "plot": "audit.png",
            "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("privacy.engine").setLevel(logging.WARNING)  # one construction per run
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's RDP search notes
    try:
        result = run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit.json").write_text(json.dumps(result, indent=1) + "\n")
    title = (f"{args.engine}, {args.sampler}: q {args.sample_rate}, {args.steps} steps, delta {args.delta:g}, "
             f"{args.accountant}")
    plot(result["sweep"], args.out / "audit.png", title)
    print(f"audit of {args.engine} at claimed epsilon {result['audits'][0]['epsilon_claimed']:.3f} "
          f"(sigma {result['audits'][0]['sigma']:.4f}):")
    print(table(result["audits"]))
    print()
    print("sweep (audited lower bounds):")
    print(sweep_table(result["sweep"]))
    print()
    outcome = ("VIOLATION: the engine is not as private as claimed" if result["violation"]
               else "no violation found (a statistical lower bound, not a proof of privacy)")
    print(f"{outcome}; confidence {args.confidence} per audit point; {result['seconds']:.0f} s; "
          f"{args.out / 'audit.json'}, {args.out / 'audit.png'}")
    return 0
