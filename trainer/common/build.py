"""The model and tokenizer a job config describes, for the training job and the tools alike."""

from __future__ import annotations

from torch import nn

from trainer.common.config import TIMM, JobConfig


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
    the tokenizer's; a classification job's classifier (trainer.job.tasks)."""
    if cfg.is_classifier:
        return build_classifier(cfg)
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


def build_classifier(cfg: JobConfig, average: bool = True) -> nn.Module:
    """The classifier ``cfg`` describes (``model.num_classes`` classes), its trainable
    parameters as ``finetune.layers`` says, and (``average``) the buffers of the parameter
    average if ``finetune.ema``."""
    from models.classifier import Classifier, add_average, timm_classifier, trainable_names

    if cfg.model.num_classes < 2:
        raise ValueError(f"model.num_classes={cfg.model.num_classes}: a classifier needs at least two classes")
    if cfg.model.name.startswith(TIMM):
        model = timm_classifier(cfg.model.name[len(TIMM):], cfg.model.num_classes, **cfg.model.overrides)
    else:
        import models

        model = Classifier(models.create_model(cfg.model.name, **cfg.model.overrides), cfg.model.num_classes)
    train = trainable_names(model, cfg.finetune.layers)
    for name, p in model.named_parameters():
        p.requires_grad_(name in train)
    if cfg.finetune.ema and average:
        add_average(model)
    return model
