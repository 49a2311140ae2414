"""The model and tokenizer a job config describes, for the training job and the tools alike."""

from __future__ import annotations

from torch import nn

from trainer.common.config import JobConfig


def build_tokenizer(cfg: JobConfig):
    """DP-Cap's tokenizer: BERT WordPiece, restricted to the synthetic captions' words
    when training on synthetic data; None for ViP."""
    if not cfg.is_captioner:
        return None
    if cfg.data.source == "synthetic":
        from trainer.common.inputs import synthetic_tokenizer

        return synthetic_tokenizer(cfg.data.seed)
    from models.tokenizer import load_tokenizer

    return load_tokenizer()


def build_model(cfg: JobConfig, tokenizer) -> nn.Module:
    """``models.create_model`` with the config's overrides; a captioner's vocabulary is
    the tokenizer's."""
    import models

    overrides = dict(cfg.model.overrides)
    if tokenizer is not None:
        if overrides.get("vocab_size", tokenizer.vocab_size) != tokenizer.vocab_size:
            raise ValueError(f"model.overrides.vocab_size={overrides['vocab_size']} but the tokenizer "
                             f"has {tokenizer.vocab_size} ids; drop the override")
        overrides["vocab_size"] = tokenizer.vocab_size
    if cfg.is_captioner:
        overrides.setdefault("text_max_length", cfg.data.text_length)
    return models.create_model(cfg.model.name, **overrides)
