"""Benchmark suite: private training steps against the non-private one, in one process.

    python -m benchmarks.suite --suite                 # CPU: small sizes; CUDA: ViT-B/16, dpcap_base at 128, bf16
    python -m benchmarks.suite --suite --out bench/    # + bench.json, bench.md, bench.png in bench/
    python -m benchmarks.suite --suite cpu-large       # ViT-B/16 and dpcap_base on a CPU (FLOPs, memory)
    python -m benchmarks.suite --model vit_b16 --batch 128 --dtype bf16 --device cuda
    python -m benchmarks.suite --model dpcap_nano --batch 8 --set img_size=64 --methods non_private,engine

On the same model (same initial weights), the same batch of random data and
the same precision, each method runs a full training step (AdamW):

- ``non_private``: ``loss.mean().backward()``;
- ``engine``: this project's :class:`privacy.PrivacyEngine` (book-keeping
  clipping, one backward, noise on);
- ``two_pass``: the same engine with ``two_pass=True``, the original DP-Cap
  algorithm (a backward for the norms, a second one of ``sum_i c_i loss_i``);
- ``opacus_ghost`` and ``opacus_hooks``: Opacus 1.6 ghost clipping and
  per-sample gradient hooks (when Opacus is installed: the ``bench`` extra);
- ``engine_bare_frozen`` (only when named in ``--methods``): the engine with
  the model's bare parameters (:attr:`PrivacyEngine.bare_parameters`: a ViT's
  ``cls_token`` and ``pos_embed``) frozen, to measure what handling them costs.

For each it reports examples/s and the ratio to non-private (timed steps,
round-robin, median; also per second of this process's CPU time, the steadier
figure on a CPU shared with other jobs), MFU against ``--peak-tflops``, and one counted step
(:mod:`benchmarks.step_counters`): FLOPs, aten operators, bytes written by non-matmul
operators, host syncs per phase, and peak live tensor bytes (CPU) or the CUDA
allocator's peak. For the engine it also reports the per-layer plan of its cost
model and the FLOP bound that plan predicts. Output: a markdown table, a JSON
line and (with ``--out``) ``bench.json``, ``bench.md`` and ``bench.png``.

Models by name: ``models.create_model`` names (``dpcap_base``, ``vip_base``...),
``torchvision:NAME`` (``torchvision:vit_b_16``: ``torchvision.models.get_model``),
``hf:CONFIG_CLASS`` (``hf:CLIPVisionConfig``: the encoder transformers'
AutoModel builds from that config, ``--set`` its fields, with a Linear head on
its pooled output) and timm names (``vit_b16``, ``vit_tiny``, ``vit_small`` are short for timm's
``vit_*_patch16_224``), taken as timm builds them (random weights: nothing is
downloaded), every parameter trainable: ``--model convnext_atto``,
``--model swin_tiny_patch4_window7_224``. BatchNorm (ResNets, RegNets) is
converted to GroupNorm by :func:`privacy.convert.replace_batchnorm` (logged)
for every method, the non-private one too, so that all train the same model.
"""

import argparse
import ast
import copy
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import models
from benchmarks.step_counters import count_step, phase, time_steps
from models.dpcap import DPCap
from models.tokenizer import BOS_ID, EOS_ID
from privacy.convert import replace_batchnorm
from privacy.engine import PrivacyEngine

logger = logging.getLogger("benchmarks.suite")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
METHODS = ("non_private", "engine", "two_pass", "opacus_ghost", "opacus_hooks")
# on request only: the engine with the model's bare parameters frozen (what handling them costs)
EXTRA_METHODS = ("engine_bare_frozen",)
TIMM_ALIASES = {"vit_b16": "vit_base_patch16_224", "vit_small": "vit_small_patch16_224",
                "vit_tiny": "vit_tiny_patch16_224"}
MAX_GRAD_NORM, NOISE_MULTIPLIER = 1.0, 1.0


@dataclass(frozen=True)
class Case:
    """One benchmarked configuration (``steps``: timed steps, None: the command's)."""

    model: str
    batch: int
    img_size: int | None = None
    dtype: str = "fp32"
    overrides: dict = field(default_factory=dict)
    steps: int | None = None

    @property
    def label(self) -> str:
        size = f" {self.img_size}px" if self.img_size else ""
        extra = "".join(f" {k}={v}" for k, v in self.overrides.items())
        return f"{self.model}{size}{extra}, batch {self.batch}, {self.dtype}"


# the CPU figures (fp32, small enough for a 2-core machine: a few minutes), the
# targets' large models on a CPU (FLOPs and memory; slow), and the GPU goal
SUITES = {
    "cpu": [
        Case("vit_tiny", 32, img_size=64),   # 17 tokens
        Case("vit_tiny", 16, img_size=224),  # 197 tokens
        Case("vit_small", 8, img_size=224),
    ],
    "cpu-large": [
        Case("vit_b16", 2, img_size=224, steps=1),
        Case("dpcap_base", 2, steps=1),
        Case("vit_b16", 16, img_size=224, steps=0),  # counted only: memory where activations dominate
    ],
    "cuda": [
        Case("vit_b16", 128, img_size=224, dtype="bf16"),
        Case("dpcap_base", 128, dtype="bf16"),
    ],
}


# ----------------------------------------------------------------------------- models

class PerExampleCrossEntropy(nn.Module):
    """A classifier (images -> logits) as a per-example loss (images, labels) -> [b]."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.classifier(images).float(), labels, reduction="none")


def build_model(case: Case) -> tuple[nn.Module, Callable[[int, torch.Generator], tuple]]:
    """The model (returning per-example losses) and a maker of random input batches."""
    if case.model in models.REGISTRY:
        overrides = dict(case.overrides, **({"img_size": case.img_size} if case.img_size else {}))
        model = models.create_model(case.model, **overrides)
        c = model.config

        def inputs(batch: int, gen: torch.Generator) -> tuple:
            images = torch.randn(batch, 3, c.img_size, c.img_size, generator=gen)
            if not isinstance(model, DPCap):
                return (images,)
            tokens = torch.randint(1, c.vocab_size, (batch, c.text_max_length), generator=gen)  # no PAD
            tokens[:, 0], tokens[:, -1] = BOS_ID, EOS_ID
            return images, tokens

        return model, inputs
    library, _, name = case.model.rpartition(":")
    if library == "torchvision":
        classifier, size, classes = _torchvision_classifier(name, case)
    elif library == "hf":
        classifier, size, classes = _transformers_classifier(name, case)
    elif not library:
        classifier, size, classes = _timm_classifier(name, case)
    else:
        raise ValueError(f"unknown model library {library!r} in {case.model!r}: torchvision:NAME, hf:CONFIG_CLASS, "
                         "or a timm or models.create_model name")
    changed = replace_batchnorm(classifier)
    if changed:
        logger.info("%s: %d BatchNorm layers -> GroupNorm (privacy.convert.replace_batchnorm)", name, len(changed))

    def inputs(batch: int, gen: torch.Generator) -> tuple:
        return (torch.randn(batch, 3, size, size, generator=gen),
                torch.randint(0, classes, (batch,), generator=gen))

    return PerExampleCrossEntropy(classifier), inputs


def _timm_classifier(name: str, case: Case) -> tuple[nn.Module, int, int]:
    import timm

    name = TIMM_ALIASES.get(name, name)
    if not timm.is_model(name):
        raise ValueError(f"unknown model {case.model!r}: neither a models.create_model name "
                         f"({', '.join(sorted(models.REGISTRY))}) nor a timm model")
    try:
        classifier = timm.create_model(name, pretrained=False, **dict(
            case.overrides, **({"img_size": case.img_size} if case.img_size else {})))
    except TypeError as error:  # a CNN (ResNet, ConvNeXt) has no img_size: it takes images of any size
        if not case.img_size or "img_size" not in str(error):
            raise
        classifier = timm.create_model(name, pretrained=False, **case.overrides)
    size = classifier.pretrained_cfg.get("input_size", (3, 224, 224))[-1] if not case.img_size else case.img_size
    return classifier, size, classifier.num_classes


def _torchvision_classifier(name: str, case: Case) -> tuple[nn.Module, int, int]:
    """``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``
    (nothing downloaded), ``--img-size`` as ViT's ``image_size`` where it takes one."""
    import torchvision

    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown model {case.model!r}: not in torchvision.models.list_models()")
    overrides = dict(case.overrides)
    try:
        classifier = torchvision.models.get_model(name, weights=None, **dict(
            overrides, **({"image_size": case.img_size} if case.img_size else {})))
    except TypeError as error:  # CNNs take images of any size
        if not case.img_size or "image_size" not in str(error):
            raise
        classifier = torchvision.models.get_model(name, weights=None, **overrides)
    return classifier, case.img_size or 224, overrides.get("num_classes", 1000)


class VisionEncoderClassifier(nn.Module):
    """A transformers vision encoder (images -> its pooled output, or its first
    token where it has no pooler) and a Linear head: images -> logits."""

    def __init__(self, encoder: nn.Module, width: int, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.encoder(pixel_values=images)
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state[:, 0]
        return self.head(pooled)


def _transformers_classifier(name: str, case: Case) -> tuple[nn.Module, int, int]:
    """``hf:CONFIG_CLASS`` (``hf:CLIPVisionConfig``): the encoder transformers'
    AutoModel builds from that config (random weights, nothing downloaded), with
    ``--set`` overrides as config fields and ``--img-size`` as ``image_size``."""
    import transformers

    config_class = getattr(transformers, name, None)
    if not (isinstance(config_class, type) and issubclass(config_class, transformers.PretrainedConfig)):
        raise ValueError(f"unknown model {case.model!r}: {name} is not a transformers config class")
    overrides = dict(case.overrides)
    classes = overrides.pop("num_classes", 1000)
    config = config_class(**dict(overrides, **({"image_size": case.img_size} if case.img_size else {})))
    encoder = transformers.AutoModel.from_config(config)
    width = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]
    return VisionEncoderClassifier(encoder, width, classes), getattr(config, "image_size", 224), classes


# ----------------------------------------------------------------------------- methods

@dataclass
class Method:
    """One way of training: ``step(counts)`` runs a full step (``counts`` is the
    :class:`benchmarks.step_counters.StepCounts` being filled, or None when timing)."""

    step: Callable
    close: Callable[[], None] = lambda: None
    info: Callable[[], dict] = dict


def _optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.005,
                             fused=device.type == "cuda")


def make_method(name: str, model: nn.Module, inputs: tuple, batch: int, device: torch.device,
                autocast, compile_model: bool = False, reuse_memory: float = 1.0) -> Method:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(params, device)

    def forward(run, counts):
        with phase(counts, "forward"), autocast:
            return run(*inputs)

    if name == "non_private":
        run = torch.compile(model) if compile_model else model

        def step(counts=None):
            loss = forward(run, counts)
            with phase(counts, "backward"):
                loss.mean().backward()
            with phase(counts, "step"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        return Method(step)

    if name in ("engine", "two_pass", "engine_bare_frozen"):
        if name == "engine_bare_frozen":  # AdamW skips parameters that get no gradient
            probe = PrivacyEngine(model, MAX_GRAD_NORM, NOISE_MULTIPLIER, batch)
            bare = set(probe.bare_parameters)
            probe.detach()
            for qualified, param in model.named_parameters():
                param.requires_grad_(qualified not in bare and param.requires_grad)
        engine = PrivacyEngine(model, MAX_GRAD_NORM, NOISE_MULTIPLIER, batch, seed=0, two_pass=name == "two_pass",
                               reuse_memory=reuse_memory)

        def step(counts=None):
            loss = forward(model, counts)
            with phase(counts, "backward"):
                engine.backward(loss)
            with phase(counts, "step"):
                engine.finish_step()
                optimizer.step()
                engine.zero_grad()

        def info():
            plan = engine.plan
            return {"plan": {q: p.as_dict() for q, p in plan.items()},
                    "predicted_extra_flops": sum(p.extra_flops for p in plan.values())}

        return Method(step, engine.detach, dict if name == "two_pass" else info)

    if name in ("opacus_ghost", "opacus_hooks"):
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        common = dict(noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=MAX_GRAD_NORM,
                      expected_batch_size=batch, loss_reduction="mean")
        if name == "opacus_hooks":
            wrapped = GradSampleModule(model, loss_reduction="mean")
            dp_optimizer = DPOptimizer(optimizer, **common)
        else:
            wrapped = GradSampleModuleFastGradientClipping(
                model, max_grad_norm=MAX_GRAD_NORM, use_ghost_clipping=True, loss_reduction="mean")
            dp_optimizer = DPOptimizerFastGradientClipping(optimizer, **common)

        def step(counts=None):
            loss = forward(wrapped, counts)
            with phase(counts, "backward"):
                if name == "opacus_hooks":
                    loss.mean().backward()
                else:
                    DPTensorFastGradientClipping(wrapped, dp_optimizer, loss, "mean").backward()
            with phase(counts, "step"):
                dp_optimizer.step()
                dp_optimizer.zero_grad(set_to_none=True)

        return Method(step, wrapped.remove_hooks)

    raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS + EXTRA_METHODS)}")


def opacus_available() -> bool:
    try:
        import opacus  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------- running

def run_case(case: Case, methods: list[str], device: torch.device, steps: int, warmup: int,
             peak_tflops: float, compile_model: bool = False, reuse_memory: float = 1.0) -> dict:
    """Every method on one case, each on its own copy of the same model, timed
    round-robin (with more than one timed step; otherwise one method at a time,
    so that only one copy of a large model and its optimizer state is alive);
    a method that does not fit in memory is reported, not fatal."""
    torch.manual_seed(0)
    prototype, make_inputs = build_model(case)
    prototype.to(device)
    inputs = tuple(t.to(device) for t in make_inputs(case.batch, torch.Generator().manual_seed(0)))
    autocast = torch.autocast(device.type, dtype=DTYPES[case.dtype], enabled=case.dtype != "fp32")
    result = {"case": case.label, "model": case.model, "batch": case.batch, "img_size": case.img_size,
              "dtype": case.dtype, "overrides": case.overrides, "device_type": device.type,
              "trainable_params": sum(p.numel() for p in prototype.parameters() if p.requires_grad),
              "methods": {}}
    steps = case.steps if case.steps is not None else steps

    def build(name: str) -> Method | None:
        try:
            method = make_method(name, copy.deepcopy(prototype), inputs, case.batch, device, autocast,
                                 compile_model and name == "non_private", reuse_memory)
            method.step()  # a first step apart: one that does not fit fails here, alone
            return method
        except torch.cuda.OutOfMemoryError as error:
            result["methods"][name] = {"error": f"out of memory: {str(error).splitlines()[0]}"}
            torch.cuda.empty_cache()
            return None
        except (NotImplementedError, ValueError) as error:  # a library that refuses the model (Opacus: Swin)
            result["methods"][name] = {"error": f"refused: {' '.join(str(error).split())[:300]}"}
            logger.warning("%s | %s: %s", case.label, name, result["methods"][name]["error"])
            return None

    def report(name: str, method: Method, timed: dict) -> None:
        with count_step() as counts:
            method.step(counts)
        figures = {**timed, **counts.summary(), **method.info(), "gflop_per_example": counts.flops / case.batch / 1e9}
        if steps:
            figures["examples_per_s"] = case.batch / timed["seconds"]
            figures["examples_per_cpu_s"] = case.batch / timed["cpu_seconds"]
            figures["tflop_per_s"] = counts.flops / timed["seconds"] / 1e12
            figures["mfu"] = figures["tflop_per_s"] / peak_tflops
        method.close()
        result["methods"][name] = figures
        logger.info("%s | %s: %s", case.label, name, _one_line(figures))

    if steps > 1:
        built = {name: method for name in methods if (method := build(name)) is not None}
        timed = time_steps({name: method.step for name, method in built.items()}, steps, warmup, device)
        for name, method in built.items():
            report(name, method, timed[name])
    else:
        for name in methods:
            if (method := build(name)) is not None:
                report(name, method, time_steps({name: method.step}, steps, warmup, device)[name] if steps else {})
                del method
    result["methods"] = {m: result["methods"][m] for m in methods if m in result["methods"]}
    _add_ratios(result)
    return result


def _one_line(figures: dict) -> str:
    if "error" in figures:
        return figures["error"]
    return (f"{figures.get('examples_per_s', float('nan')):.2f} ex/s, {figures['flops'] / 1e9:.1f} GFLOP, "
            f"{figures['aten_ops']} ops, syncs {figures['syncs_by_phase']}")


def _add_ratios(result: dict) -> None:
    """Ratios to the non-private step, and the engine's FLOPs against its plan's bound."""
    base = result["methods"].get("non_private")
    if not base or "error" in base:
        return
    plain_peak = base.get("cuda_peak_bytes", base["peak_live_bytes"])
    # what a plain backward holds at its peak (the optimizer step's temporaries left out)
    plain_backward_peak = max(base["peak_by_phase"].get(p, 0) for p in ("forward", "backward"))
    plain_syncs = base["syncs_by_phase"]
    for name, figures in result["methods"].items():
        if "error" in figures:
            continue
        if "examples_per_s" in figures:
            figures["throughput_ratio"] = figures["examples_per_s"] / base["examples_per_s"]
            figures["cpu_throughput_ratio"] = figures["examples_per_cpu_s"] / base["examples_per_cpu_s"]
        figures["flops_ratio"] = figures["flops"] / base["flops"]
        peak = figures.get("cuda_peak_bytes", figures["peak_live_bytes"])
        figures["peak_ratio"] = peak / plain_peak
        if figures.get("live_after_backward") is not None:
            figures["held_after_backward_ratio"] = figures["live_after_backward"] / plain_backward_peak
        # syncs the private step adds to the model's own, per micro-batch (forward + backward)
        figures["added_syncs_per_micro_batch"] = sum(
            figures["syncs_by_phase"].get(p, 0) - plain_syncs.get(p, 0) for p in ("forward", "backward"))
        if "predicted_extra_flops" in figures:
            figures["flops_bound"] = base["flops"] + figures["predicted_extra_flops"]
            figures["flops_over_bound"] = figures["flops"] / figures["flops_bound"]


def markdown(results: list[dict]) -> str:
    lines = [
        "| case | method | ex/s | vs non-private (wall; CPU time) | FLOPs (x, vs bound) | aten ops "
        "| non-matmul MB | syncs fwd+bwd / step | peak MB (x) | held after backward (x plain backward peak) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for name, f in result["methods"].items():
            if "error" in f:
                lines.append(f"| {result['case']} | {name} | {f['error']} | | | | | | | |")
                continue
            bound = f" ({f['flops_over_bound']:.3f} of bound)" if "flops_over_bound" in f else ""
            syncs = f["syncs_by_phase"]
            held = (f"{f['live_after_backward'] / 2**20:.0f} ({f['held_after_backward_ratio']:.2f}x)"
                    if f.get("live_after_backward") is not None else "")
            peak = f.get("cuda_peak_bytes", f["peak_live_bytes"])
            timed = (f"{f['examples_per_s']:.2f} | {f['throughput_ratio']:.2f}x; {f['cpu_throughput_ratio']:.2f}x"
                     if "throughput_ratio" in f else "- | - (counted only)")
            lines.append(
                f"| {result['case']} | {name} | {timed} "
                f"| {f['flops'] / 1e9:.2f} G ({f.get('flops_ratio', 1):.3f}x){bound} | {f['aten_ops']} "
                f"| {f['non_matmul_bytes'] / 2**20:.0f} "
                f"| {syncs.get('forward', 0) + syncs.get('backward', 0)} / {syncs.get('step', 0)} "
                f"| {peak / 2**20:.0f} ({f.get('peak_ratio', 1):.2f}x) | {held} |")
    return "\n".join(lines)


def plan_markdown(result: dict) -> str:
    """The engine's per-layer choices (kinds counted) for one case."""
    plan = result["methods"].get("engine", {}).get("plan")
    if not plan:
        return ""
    kinds: dict[str, int] = {}
    for p in plan.values():
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return f"{result['case']}: " + ", ".join(f"{n} layers {k}" for k, n in sorted(kinds.items()))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in METHODS + EXTRA_METHODS if any(m in r["methods"] for r in results)]
    on_cpu = all(r["device_type"] == "cpu" for r in results)
    key = "cpu_throughput_ratio" if on_cpu else "throughput_ratio"
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(results)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [r["methods"].get(name, {}).get(key, 0.0) for r in results]
        ax.bar([k + i * width for k in range(len(results))], values, width, label=name)
    ax.set_xticks([k + width * (len(names) - 1) / 2 for k in range(len(results))])
    ax.set_xticklabels([r["case"] for r in results], rotation=15, ha="right", fontsize=7)
    ax.set_ylabel("examples per CPU second, relative to non-private" if on_cpu
                  else "examples/s relative to non-private")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="?", const="", default=None, choices=["", *SUITES],
                   help="standard cases: alone, those of --device (cpu or cuda); or a name (" + "; ".join(
                       f"{d}: " + ", ".join(c.label for c in cases) for d, cases in SUITES.items()) + ")")
    p.add_argument("--model", default="vit_tiny", help="a models.create_model or timm name (vit_b16, vit_small...)")
    p.add_argument("--batch", type=int, default=8, help="micro-batch: examples per step")
    p.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="autocast dtype (fp32: none); default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated, from " + ", ".join(METHODS + EXTRA_METHODS)
                   + " (Opacus ones skipped if not installed; engine_bare_frozen: the engine with the model's "
                   "bare parameters, such as a ViT's cls_token and pos_embed, frozen)")
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per method, round-robin (the median is reported); 0: counts only")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed steps per method besides the first, which always runs apart")
    p.add_argument("--peak-tflops", type=float, default=797.0,
                   help="the device's matrix rate for MFU (797: an H100's measured bf16 8192^3 rate)")
    p.add_argument("--compile", action="store_true", help="torch.compile the non-private model")
    p.add_argument("--reuse-memory", type=float, default=1.0,
                   help="the engine's reuse_memory: per-example gradients kept where <= this x their (a, g) pair")
    p.add_argument("--out", type=Path, default=None, help="folder for bench.json, bench.md, bench.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := sorted(set(methods) - set(METHODS + EXTRA_METHODS)):
        raise ValueError(f"unknown --methods {unknown}; choose from {', '.join(METHODS + EXTRA_METHODS)}")
    if not opacus_available():
        logger.warning("Opacus is not installed (pip install -e '.[dev]'): its methods are skipped")
        methods = [m for m in methods if not m.startswith("opacus")]
    if args.suite is not None:
        cases = SUITES[args.suite or ("cuda" if device.type == "cuda" else "cpu")]
        if args.dtype:
            cases = [dataclasses.replace(c, dtype=args.dtype) for c in cases]
    else:
        dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
        cases = [Case(args.model, args.batch, args.img_size, dtype, _overrides(args.set))]
    results = [run_case(c, methods, device, args.steps, args.warmup, args.peak_tflops, args.compile,
                        args.reuse_memory) for c in cases]
    table = markdown(results)
    plans = "\n".join(filter(None, (plan_markdown(r) for r in results)))
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu ({torch.get_num_threads()} threads)"
    report = f"device: {device_name}, torch {torch.__version__}\n\n{table}\n\nengine plans:\n{plans}\n"
    print(report)
    # one JSON line of the figures; the engine's per-layer plans go to bench.json only
    print(json.dumps([{**r, "methods": {m: {k: v for k, v in f.items() if k != "plan"}
                                         for m, f in r["methods"].items()}} for r in results]))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps({"device": device_name, "results": results}, indent=1))
        (args.out / "bench.md").write_text(report)
        plot(results, args.out / "bench.png")
    return results


if __name__ == "__main__":
    main()
