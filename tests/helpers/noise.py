"""Checks on the whole gradients a run stepped from (the worker's capture=grads): noise of
the claimed scale, added once per coordinate, from independent streams on each rank."""

from __future__ import annotations

import torch

SIGMA = 20.0  # a noise multiplier this large swamps the clipped sum: the gradient is noise within 6% (norm)
def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def rank_draws(grads: dict[str, torch.Tensor], world: int, flat_partitions: bool = False) -> list[torch.Tensor]:
    """Each rank's part of the leading parameters of one step's whole gradients, up to the
    first that does not split evenly: dim-0 chunks of ceil(rows / world) rows (FSDP2, ZeRO 0-2)
    or of the flattened parameter (ZeRO-3). The engine draws a rank's noise parameter after
    parameter from one generator; two ranks sharing a stream would draw these parts alike,
    but only while their parts have equal shapes: torch.randn of 40 and of 30 elements from
    one seed differ everywhere (checked), so after the first uneven part nothing lines up."""
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for g in grads.values():
        g = g.flatten() if flat_partitions else g
        if g.shape[0] % world:
            break
        n = g.shape[0] // world
        for rank, part in enumerate(parts):
            part.append(g[rank * n: (rank + 1) * n].flatten())
    return [torch.cat(part) for part in parts]


def assert_noised_once_per_coordinate(steps: list[dict[str, torch.Tensor]], sigma: float, clip: float, batch: int,
                                      world: int, flat_partitions: bool = False) -> None:
    """The captured gradients of ``steps`` (noise swamping the clipped sum) are N(0, (sigma C / B)^2)
    per coordinate, and rank 0's draws are uncorrelated with rank 1's (rank_draws)."""
    expected = sigma * clip / batch
    grads = torch.cat([flat(g) for g in steps])
    assert grads.numel() > 1000, grads.numel()
    # 4000 coordinates: standard error of the std 1.1%; noised twice would be +41%, once per rank
    # and averaged over 2 ranks -29%, not at all -100%
    assert abs(grads.std().item() / expected - 1) < 0.06, grads.std().item() / expected
    assert abs(grads.mean().item()) < 4 * expected / grads.numel() ** 0.5
    draws = [rank_draws(step, world, flat_partitions) for step in steps]
    pairs = torch.stack([torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])])
    corr = torch.corrcoef(pairs)[0, 1].item()
    # 450 pairs or more: standard error 0.05 or less; ranks sharing one stream give about 1
    assert pairs.shape[1] >= 450 and abs(corr) < 0.25, (pairs.shape, corr)
