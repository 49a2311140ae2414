"""A tiny stand-in for DP-Cap (five layer kinds, per-example loss), its data and a
trainer config for it; and the overrides that make the real models tiny."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, WIDTH, TEXT = 11, 10, 4

# the real DP-Cap and ViP shrunk to seconds on a CPU
TINY_MODEL = ["model.overrides.img_size=32", "model.overrides.patch_size=8", "model.overrides.embed_dim=32",
              "model.overrides.depth=1", "model.overrides.num_heads=2", "model.overrides.decoder_embed_dim=32",
              "model.overrides.decoder_depth=1", "model.overrides.decoder_num_heads=2"]
# noise on, a fixed secret seed, 8 steps saved every 2: runs killed midway, then resumed
NOISY_CHECKPOINTED = {"privacy.noise_multiplier": 1.0, "privacy.secret_seed": 7, "steps": 8,
                      "checkpoint.every_steps": 2}
# the real (tiny) DP-Cap on webdataset shards, so that the shards' index is part of the run
TINY_DPCAP_ON_SHARDS = [*TINY_MODEL, "model.name=dpcap_nano", "data.text_length=16",
                        "ds.train_micro_batch_size_per_gpu=16", "data.source=shards", "data.num_examples=0"]


class TinyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 7)  # 7 rows: uneven shards on 2 and 3 ranks
        self.fc2 = nn.Linear(7, WIDTH)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyCaptioner(nn.Module):
    """model(images, tokens) -> per-example loss [B], like DP-Cap, in 5 layer kinds."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, WIDTH)
        self.blocks = nn.ModuleList([TinyBlock(), TinyBlock()])
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, images, tokens):
        x = self.embed(images.flatten(1))
        for block in self.blocks:
            x = block(x)
        logits = self.head(x.unsqueeze(1) + self.tok(tokens))  # [B, T, V]
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none").mean(1)


class InMemoryReader:
    """Micro-batches of a list of tuples of tensors, as the sampler draws them."""

    def __init__(self, dataset: list[tuple[torch.Tensor, ...]], batch_source):
        self.dataset = dataset
        self.batch_source = batch_source
        self.next_step = 0
        self.skipped = 0

    def micro_batches(self, step: int):
        for indices in self.batch_source.step_batches(step):
            if indices:
                samples = [self.dataset[i] for i in indices]
                yield tuple(torch.stack(column) for column in zip(*samples))
        self.next_step = step + 1

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])


class InMemoryData(list):
    """The stand-in's examples as the Trainer takes data in memory (trainer.job.training_data.InMemoryData)."""

    def reader(self, sampler) -> InMemoryReader:
        return InMemoryReader(self, sampler)


def tiny_data(n: int = 96, seed: int = 0) -> InMemoryData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 2, 2, generator=g)
    labels = (images.mean((1, 2, 3)) > 0).long()
    tokens = torch.stack([torch.tensor([1, 2 + int(y), 5 + int(y), 9]) for y in labels])
    return InMemoryData((images[i], tokens[i]) for i in range(n))


def tiny_config(tmp: Path, **overrides) -> dict:
    """A JSON-able config for the stand-in; overrides use dotted keys."""
    cfg = {
        "name": "tiny", "ds_config": "default.json", "steps": 6, "seed": 3,
        "ds": {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": False}},
        "model": {"name": "dpcap_tiny_standin", "overrides": {"img_size": 2}},
        "data": {"num_examples": 96, "text_length": TEXT},
        # a fixed secret seed: runs compared with each other must draw the same batches
        "privacy": {"noise_multiplier": 0.0, "max_grad_norm": 0.5, "delta": 1e-3, "secret_seed": 5},
        "optim": {"lr": 0.05, "warmup_steps": 2},
        "checkpoint": {"dir": str(tmp / "ckpt"), "every_steps": 0, "keep_last": 2},
        "metrics": {"log_dir": str(tmp / "tb"), "log_every": 1, "pld_every": 3, "progress": False},
        "eval": {"zero_shot": False},
    }
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return cfg
