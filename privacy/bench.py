"""Benchmark: the private training step against the non-private one.

    python -m privacy.bench                                  # small ViT, CPU, seconds
    python -m privacy.bench --model vit_b16 --batch 128 --dtype bf16 --device cuda

Times, in one run, on the same model and the same batch of random data:
non-private ``loss.mean().backward()`` + AdamW step, and private
``engine.backward(loss)`` + ``engine.finish_step()`` (noise on) + AdamW step.
Reports examples/s, peak memory (CUDA only: ``max_memory_allocated``) and the
private / non-private ratios. ``--model dpcap_base`` (or any name
``models.create_model`` knows) benchmarks a project model instead.
"""

import argparse
import json
import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from privacy.engine import PrivacyEngine
from privacy.layers import AddedParameter

logger = logging.getLogger("privacy.bench")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ViTConfig:
    img_size: int
    patch: int
    dim: int
    depth: int
    heads: int
    classes: int


VIT_CONFIGS = {
    "small": ViTConfig(img_size=32, patch=4, dim=64, depth=2, heads=4, classes=10),  # 65 tokens
    "vit_b16": ViTConfig(img_size=224, patch=16, dim=768, depth=12, heads=12, classes=1000),  # 197 tokens
}


class Block(nn.Module):
    """Pre-norm transformer block: fused-qkv attention and a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # x: [B, L, D]
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, D/H]
        x = x + self.proj(attn.transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A plain ViT classifier (timm's ViT-B/16 layout) returning per-example losses."""

    def __init__(self, c: ViTConfig):
        super().__init__()
        self.config = c
        tokens = (c.img_size // c.patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(3, c.dim, kernel_size=c.patch, stride=c.patch)
        self.cls_token = AddedParameter(1, 1, c.dim, init_std=0.02)
        self.pos_embed = AddedParameter(1, tokens, c.dim, init_std=0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim, eps=1e-6)
        self.head = nn.Linear(c.dim, c.classes)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, L, D]
        cls = self.cls_token(x.new_zeros(x.shape[0], 1, x.shape[2]))
        x = self.pos_embed(torch.cat([cls, x], dim=1))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x[:, 0]))
        return F.cross_entropy(logits.float(), labels, reduction="none")


def build(name: str, batch: int, device: torch.device, generator: torch.Generator) -> tuple[nn.Module, tuple]:
    """The model and one batch of random inputs for it."""
    if name in VIT_CONFIGS:
        c = VIT_CONFIGS[name]
        model = ViT(c)
        inputs = (torch.randn(batch, 3, c.img_size, c.img_size, generator=generator),
                  torch.randint(0, c.classes, (batch,), generator=generator))
    else:
        import models  # only for project models: keeps privacy/ free of a models dependency

        model = models.create_model(name)
        c = model.config
        images = torch.randn(batch, 3, c.img_size, c.img_size, generator=generator)
        inputs = (images, torch.randint(1, c.vocab_size, (batch, c.text_max_length), generator=generator)) \
            if hasattr(c, "text_max_length") else (images,)
    return model.to(device), tuple(t.to(device) for t in inputs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """Median seconds per step and peak GiB allocated during the timed steps (CUDA only)."""
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def run(model_name: str, batch: int, steps: int, warmup: int, device: str, dtype: str) -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    model, inputs = build(model_name, batch, device, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")

    def plain_step():
        with autocast:
            loss = model(*inputs)
        loss.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    plain_s, plain_gib = measure(plain_step, steps, warmup, device)

    engine = PrivacyEngine(model, max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=batch, seed=0)

    def private_step():
        with autocast:
            loss = model(*inputs)
        engine.backward(loss)
        engine.finish_step()
        optimizer.step()
        engine.zero_grad()

    private_s, private_gib = measure(private_step, steps, warmup, device)
    engine.detach()

    result = {
        "model": model_name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": batch, "dtype": dtype, "steps": steps,
        "parameters": sum(p.numel() for p in model.parameters()),
        "non_private_examples_per_s": batch / plain_s, "private_examples_per_s": batch / private_s,
        "throughput_ratio": plain_s / private_s,
        "non_private_peak_gib": plain_gib, "private_peak_gib": private_gib,
        "memory_ratio": private_gib / plain_gib if plain_gib else None,
    }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small",
                        help=f"{' or '.join(VIT_CONFIGS)} (built here), or a models.create_model name, e.g. dpcap_base")
    parser.add_argument("--batch", type=int, default=32, help="micro-batch: examples per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype (fp32: no autocast)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(args.model, args.batch, args.steps, args.warmup, args.device, args.dtype)
    memory = "n/a on CPU" if result["memory_ratio"] is None else (
        f"{result['non_private_peak_gib']:.2f} -> {result['private_peak_gib']:.2f} GiB "
        f"({result['memory_ratio']:.2f}x)")
    logger.info("%s batch %d %s on %s: non-private %.1f ex/s, private %.1f ex/s (%.2fx); peak memory %s",
                args.model, args.batch, args.dtype, result["device"], result["non_private_examples_per_s"],
                result["private_examples_per_s"], result["throughput_ratio"], memory)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
