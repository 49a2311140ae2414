"""Data: synthetic captioned scenes, shard writing, safe decoding, the Poisson reader.

Imports neither `models` nor `privacy`: the trainer injects the tokenizer and
the Poisson batch source.
"""

from data.samples import SampleReader, read_samples

__all__ = ["SampleReader", "read_samples"]
