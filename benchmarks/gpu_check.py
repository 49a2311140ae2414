"""One prepared check for the first GPU: ``./launch.sh gpu-check --out DIR``.

    ./launch.sh gpu-check --out gpu_check/            # on a machine with one GPU, under 8 minutes
    ./launch.sh gpu-check --device cpu --out DIR      # the same steps at tiny shapes (the test suite)

Writes ``DIR/gpu_check.json`` and ``DIR/gpu_check.md`` with:

1. exactness of the engine's device code paths (padded Gram bmm, fp32-output
   matmuls of bf16 operands, per-example bmm, the clipped sums) on small
   DP-Cap, ViP and timm ViT models: the clipped gradient in fp32 and in bf16
   autocast against per-example gradients of plain autograd, one example at a
   time (fp32); and, in bf16, every single example's clipped contribution
   against C;
2. the benchmark suite (``benchmarks.suite``) on ViT-B/16 and dpcap_base at
   micro-batch 128 in bf16: this engine, the two-pass mode, Opacus, the
   non-private step;
3. the largest private micro-batch of dpcap_base (bf16) that fits;
4. ``python -m trainer.train --config default_gpu`` for 50 steps, in a
   subprocess (as a user runs it), with its throughput and memory from its
   TensorBoard events.

A step that fails is recorded with its error and the others still run.
"""

import argparse
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

import models
from benchmarks import suite
from models.tokenizer import BOS_ID, EOS_ID, PAD_ID
from privacy import PrivacyEngine

logger = logging.getLogger("benchmarks.gpu_check")
REPO = Path(__file__).resolve().parent.parent

# tolerances: this check measures 2-5e-6 (fp32) and 0.9-1.5% (bf16) on CPU (2026-12-01)
FP32_TOLERANCE, BF16_TOLERANCE = 1e-4, 6e-2


def _tiny_models(device: torch.device) -> dict[str, tuple]:
    """name -> (model, inputs): every rule's device path, 17 tokens (padded to 32 on CUDA)."""
    gen = torch.Generator().manual_seed(0)
    b = 6
    dpcap = models.create_model("dpcap_nano", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, vocab_size=128,
                                text_max_length=9)
    tokens = torch.randint(1, 128, (b, 9), generator=gen)
    tokens[:, 0], tokens[:, -1] = BOS_ID, EOS_ID
    tokens[1, 4], tokens[1, 5:] = EOS_ID, PAD_ID  # a shorter caption
    vip = models.create_model("vip_base", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    noise = torch.rand(b, 16, generator=gen)
    vit, _ = suite.build_model(suite.Case("vit_tiny", b, img_size=32, overrides={"depth": 1}))
    images = torch.randn(b, 3, 32, 32, generator=gen)
    cases = {
        "dpcap_nano (tiny)": (dpcap, (images, tokens), lambda m, x, t: m(x, t)),
        "vip_base (tiny)": (vip, (images, noise), lambda m, x, z: m(x, 0.75, noise=z)),
        "timm vit_tiny (tiny)": (vit, (images, torch.randint(0, 1000, (b,), generator=gen)), lambda m, x, y: m(x, y)),
    }
    return {name: (model.to(device), tuple(t.to(device) for t in inputs), loss)
            for name, (model, inputs, loss) in cases.items()}


def _reference(model, inputs, loss) -> dict[str, torch.Tensor]:
    """[b, ...] per-example gradients from plain autograd, one example at a time."""
    model = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: [] for n in params}
    for i in range(inputs[0].shape[0]):
        model.zero_grad(set_to_none=True)
        loss(model, *(t[i:i + 1] for t in inputs)).sum().backward()
        for n, p in params.items():
            grads[n].append(p.grad.detach().clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def check_exactness(device: torch.device) -> dict:
    results = {}
    for name, (model, inputs, loss) in _tiny_models(device).items():
        reference = _reference(model, inputs, loss)
        # float64: an fp32 norm of a long vector is off by up to 1e-4 relative on CPU
        norms = torch.cat([g.double().flatten(1) for g in reference.values()], 1).norm(dim=1)
        max_norm = norms.median().item()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        b = inputs[0].shape[0]
        expected = {n: (torch.einsum("b,b...->...", scale, g.double()) / b).float() for n, g in reference.items()}
        norms = norms.float()
        row = {"max_norm": max_norm}
        for dtype in ("fp32", "bf16"):
            copy_ = copy.deepcopy(model)
            engine = PrivacyEngine(copy_, max_norm, 0.0, b, seed=0)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                per_example_loss = loss(copy_, *inputs)
            engine.backward(per_example_loss)
            engine.finish_step()
            errors = [((p.grad.float() - expected[n]).norm() / expected[n].norm().clamp(min=1e-12)).item()
                      for n, p in copy_.named_parameters() if p.requires_grad]
            row[f"{dtype}_max_relative_error"] = max(errors)
            row[f"{dtype}_norm_relative_error"] = ((engine.per_example_norms - norms).abs() / norms).max().item()
            row["plan"] = sorted({p.kind for p in engine.plan.values()})
            engine.detach()
        row["fp32_ok"] = row["fp32_max_relative_error"] <= FP32_TOLERANCE
        row["bf16_ok"] = row["bf16_max_relative_error"] <= BF16_TOLERANCE
        row["bf16_worst_contribution_over_c"] = _worst_contribution(model, inputs, loss, 0.2 * max_norm, device)
        row["bound_ok"] = row["bf16_worst_contribution_over_c"] <= 1.0
        results[name] = row
        logger.info("exactness %s: %s", name, row)
    return results


def _worst_contribution(model, inputs, loss, max_norm: float, device: torch.device) -> float:
    """max_i ||clipped contribution of example i|| / C in bf16, one example per step."""
    model = copy.deepcopy(model)
    engine = PrivacyEngine(model, max_norm, 0.0, 1.0, seed=0)
    worst = 0.0
    for i in range(inputs[0].shape[0]):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            per_example_loss = loss(model, *(t[i:i + 1] for t in inputs))
        engine.backward(per_example_loss)
        engine.finish_step()
        norm = torch.cat([p.grad.double().flatten() for p in model.parameters() if p.grad is not None]).norm()
        worst = max(worst, norm.item() / max_norm)
        engine.zero_grad()
    engine.detach()
    return worst


def run_suite(device: torch.device, tiny: bool, steps: int) -> list[dict]:
    if tiny:
        cases = [suite.Case("vit_tiny", 4, img_size=32, overrides={"depth": 1})]
    else:
        cases = suite.SUITES["cuda"]
    methods = [m for m in suite.METHODS if suite.opacus_available() or not m.startswith("opacus")]
    return [suite.run_case(case, methods, device, steps, 0, 797.0) for case in cases]


def largest_micro_batch(device: torch.device, tiny: bool) -> dict:
    """Double the private micro-batch until it does not fit, then bisect (to 1/16 of the last fit)."""
    overrides = {"img_size": 32, "depth": 1, "decoder_depth": 1, "vocab_size": 300, "text_max_length": 8} \
        if tiny else {}
    case = suite.Case("dpcap_nano" if tiny else "dpcap_base", 0, dtype="bf16", overrides=overrides)
    model, make_inputs = suite.build_model(case)
    model.to(device)
    engine = PrivacyEngine(model, 1.0, 1.0, 128, seed=0)
    cap = 32 if tiny else 8192
    peaks = {}

    def fits(batch: int) -> bool:
        inputs = tuple(t.to(device) for t in make_inputs(batch, torch.Generator().manual_seed(batch)))
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(*inputs)
            engine.backward(loss)
            engine.finish_step()
            engine.zero_grad()
            if device.type == "cuda":
                peaks[batch] = torch.cuda.max_memory_allocated(device) / 2**30
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ok, bad = 0, None
    batch = 16 if tiny else 128
    while batch <= cap:
        if not fits(batch):
            bad = batch
            break
        ok, batch = batch, batch * 2
    if bad is not None:
        step = max(1, ok // 16)
        while bad - ok > step:
            middle = (ok + bad) // 2
            ok, bad = (middle, bad) if fits(middle) else (ok, middle)
    engine.detach()
    return {"model": case.model, "dtype": "bf16", "largest_micro_batch": ok, "first_failing": bad,
            "capped_at": cap if bad is None else None, "peak_gib_at_largest": peaks.get(ok)}


def train_default_gpu(device: torch.device, tiny: bool, out: Path, steps: int) -> dict:
    """``python -m trainer.train --config default_gpu`` in a subprocess; its own run folder under ``out``.

    The folder is emptied first: a rerun with the same ``--out`` would otherwise resume the
    finished run and report its old figures as new ones.
    """
    workdir = out / "train"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    overrides = [f"steps={steps}", "name=gpu_check", "checkpoint.every_steps=0"]
    if tiny:
        overrides += ["data.num_examples=300", "data.heldout_examples=12", "data.num_workers=0",
                      "ds.train_batch_size=16", "ds.train_micro_batch_size_per_gpu=8", "optim.warmup_steps=1",
                      "model.overrides.img_size=32", "model.overrides.depth=1", "model.overrides.decoder_depth=1",
                      "model.overrides.embed_dim=32", "model.overrides.num_heads=2",
                      "model.overrides.decoder_embed_dim=32", "model.overrides.decoder_num_heads=2",
                      "metrics.num_captions=1", "eval.probe=false", "eval.zero_shot=false"]
    command = [sys.executable, "-m", "trainer.train", "--config", "default_gpu", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=1200)
    result = {"command": " ".join(command[1:]), "returncode": proc.returncode,
              "wall_s": time.perf_counter() - start, "summary": proc.stdout.strip().splitlines()[-8:]}
    if proc.returncode != 0:
        result["stderr_tail"] = proc.stderr[-3000:]
        return result
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "runs/gpu_check/tb"))
    events.Reload()
    for tag in ("train/examples_per_s", "train/tflops_per_s", "gpu/max_memory_gib", "gpu/mfu", "train/loss"):
        if tag in events.Tags()["scalars"]:
            result[tag] = events.Scalars(tag)[-1].value
    return result


def markdown(report: dict) -> str:
    lines = [f"# gpu-check: {report['device']}", "",
             f"torch {report['torch']}, {report['date']}, {report['wall_s']:.0f} s", "", "## 1. exactness", "",
             "| model | fp32 rel. error | bf16 rel. error | bf16 worst contribution / C | plan | ok |",
             "|---|---|---|---|---|---|"]
    for name, row in report.get("exactness", {}).items():
        if "error" in row:
            lines.append(f"| {name} | {row['error']} | | | | no |")
            continue
        ok = row["fp32_ok"] and row["bf16_ok"] and row["bound_ok"]
        lines.append(f"| {name} | {row['fp32_max_relative_error']:.2e} | {row['bf16_max_relative_error']:.2e} "
                     f"| {row['bf16_worst_contribution_over_c']:.6f} | {', '.join(row['plan'])} "
                     f"| {'yes' if ok else 'NO'} |")
    lines += ["", "## 2. suite", "", suite.markdown(report["suite"]) if isinstance(report.get("suite"), list)
              else str(report.get("suite")), "", "## 3. largest private micro-batch", "",
              f"`{json.dumps(report.get('largest_micro_batch'))}`", "", "## 4. default_gpu", "",
              f"`{json.dumps({k: v for k, v in report.get('train', {}).items() if k != 'stderr_tail'})}`", ""]
    if report["failures"]:
        lines += ["## failures", ""] + [f"- {f}" for f in report["failures"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (tiny shapes, for the tests)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--train-steps", type=int, default=None, help="default_gpu steps (default 50; cpu: 2)")
    parser.add_argument("--suite-steps", type=int, default=None, help="timed steps per method (default 5; cpu: 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no GPU; on a machine without one run --device cpu")
    tiny = device.type == "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "failures": []}
    steps = {
        "exactness": lambda: check_exactness(device),
        "suite": lambda: run_suite(device, tiny, args.suite_steps or (1 if tiny else 5)),
        "largest_micro_batch": lambda: largest_micro_batch(device, tiny),
        "train": lambda: train_default_gpu(device, tiny, args.out, args.train_steps or (2 if tiny else 50)),
    }
    for name, run in steps.items():
        begun = time.perf_counter()
        try:
            report[name] = run()
        except Exception as error:  # a failed step is a finding: record it, run the others
            report[name] = {"error": f"{type(error).__name__}: {error}"}
            report["failures"].append(f"{name}: {type(error).__name__}: {error}")
            logger.error("%s failed:\n%s", name, traceback.format_exc())
        report[f"{name}_s"] = time.perf_counter() - begun
    exactness = report.get("exactness", {})
    if isinstance(exactness, dict):
        report["failures"] += [f"exactness {n}" for n, r in exactness.items()
                               if not (r.get("fp32_ok") and r.get("bf16_ok") and r.get("bound_ok"))]
    if report.get("train", {}).get("returncode", 0) != 0:
        report["failures"].append("train: non-zero exit")
    report["wall_s"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report))
    logger.info("gpu-check: %s in %.0f s; %s", "ok" if not report["failures"] else "FAILURES",
                report["wall_s"], args.out / "gpu_check.md")
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
