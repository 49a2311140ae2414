"""Pickled payloads that would run code when unpickled, for the tests that show nothing
is ever unpickled: a marker file appears if one runs."""

from __future__ import annotations

from pathlib import Path

import torch


class WritesMarker:
    """Unpickling this runs code that creates a file: the proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def assert_live(marker: Path, load) -> None:
    """The payload runs when loaded without protection: the test can fail."""
    load()
    assert marker.exists(), "the payload did not run: the refusals below would prove nothing"
    marker.unlink()


def craft_torch_file(path: Path, marker: Path, real: dict | None = None) -> None:
    """A torch.save file with a payload beside its (real) content."""
    if real is None:
        import deepspeed  # noqa: F401  (DeepSpeed's own classes are in its files)

        real = torch.load(path, map_location="cpu", weights_only=False)
    torch.save({**real, "note": WritesMarker(str(marker))}, path)
    assert_live(marker, lambda: torch.load(path, map_location="cpu", weights_only=False))
