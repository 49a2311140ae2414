"""What a job trains on and how its loss is formed, one object per kind of job:
captioning (DP-Cap), masked autoencoding (ViP) and classification (fine-tuning an
encoder on a class folder, ``data.source=classes``).

Each gives the per-example loss of a micro-batch, an empty micro-batch (a rank with
nothing to do this step still runs the collectives), a one-example sample for the FLOP
count, and how the loss reaches the gradient (``backward``). The trainer is the same for
all: engine, Poisson sampling, accounting and budget guard, backends, checkpoints.

Classification reads the class folder's images once, into memory: the readable training
images are the data set (N, so q = B / N, counts them; unreadable files are skipped and
counted before N is fixed), the validation images judge the model. Each training example
is seen as ``finetune.views`` = K augmented views (a random crop and flip, drawn from
(seed, step, example, view) so that a resumed run draws the same), which the privacy
engine groups (``engine.backward(loss, views=K)``: the K views' gradients are averaged
before clipping, so the example adds at most C, De et al. 2022). ``finetune.ema`` keeps an
exponential moving average of the parameters (post-processing of the released iterates: no
privacy cost), which evaluation and export use.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.common.build import build_classifier
from trainer.common.config import JobConfig

logger = logging.getLogger(__name__)

class Captioning:
    """DP-Cap: images and caption tokens, one loss per example."""

    views = 1

    def __init__(self, cfg: JobConfig):
        self.cfg = cfg

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0], batch[1])

    def empty(self) -> tuple[torch.Tensor, ...]:
        size = self.cfg.img_size
        return torch.empty(0, 3, size, size), torch.zeros(0, self.cfg.data.text_length, dtype=torch.long)

    def sample(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        size = self.cfg.img_size
        # shapes are fixed, so the count does not depend on the ids; 1 is in every vocabulary
        return (torch.zeros(1, 3, size, size, device=device),
                torch.ones(1, self.cfg.data.text_length, dtype=torch.long, device=device))

    def private_backward(self, engine, loss: torch.Tensor) -> None:
        engine.backward(loss)

    def load_init(self, model: nn.Module, path: str) -> None:
        import models
        from trainer.common.checkpoints import load_model_weights

        load_model_weights(model, path, partial(models.from_original_layout, model))

    def after_step(self, backend) -> None:
        """Nothing to keep beside the parameters."""


class MaskedAutoencoding(Captioning):
    """ViP: images only, a random mask per example."""

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        return model(batch[0], mask_ratio=self.cfg.model.mask_ratio)


# --------------------------------------------------------------------------- classification

class ClassImages:
    """One split of a class folder, decoded once (data.decode: image formats only, size caps)
    and kept as PIL images no larger than needed; unreadable files are skipped and counted."""

    def __init__(self, pairs: list[tuple[Path, int]], decode_size: int):
        from data.decode import BadSample, SkipCounter, decode_image

        self.images, self.labels, self.skipped = [], [], SkipCounter()
        self.bad_files: list[str] = []
        for file, label in pairs:
            try:
                image = decode_image(Path(file).read_bytes(), draft_size=decode_size)
            except BadSample as e:
                self.skipped.record(e.reason, str(file))
                self.bad_files.append(f"{file} ({e.reason})")
                continue
            except OSError as e:
                self.skipped.record("unreadable file", str(file))
                self.bad_files.append(f"{file} ({e.strerror or e})")
                continue
            if min(image.size) > 2 * decode_size:  # what the crops need, not the original's pixels
                image.thumbnail((4 * decode_size, 4 * decode_size))
            self.images.append(image)
            self.labels.append(label)

    def __len__(self) -> int:
        return len(self.images)


class ClassReader:
    """data.loader.PoissonReader's interface over :class:`ClassImages`: each step's Poisson
    micro-batches as (pixels [b K, 3, H, W], labels [b]); example i's K views are rows
    i K .. i K + K - 1."""

    def __init__(self, data: ClassImages, batch_source, to_pixels, views: int):
        self.dataset = data
        self.batch_source = batch_source
        self.to_pixels = to_pixels
        self.views = views
        self.next_step = 0
        self.skipped = data.skipped.total
        self.skipped_reasons = dict(data.skipped)

    @property
    def num_examples(self) -> int:
        return len(self.dataset)

    def micro_batches(self, step: int):
        for indices in self.batch_source.step_batches(step):
            if indices:
                pixels = [self.to_pixels(self.dataset.images[i], "", (step, i, view))[0]
                          for i in indices for view in range(self.views)]
                yield torch.stack(pixels), torch.tensor([self.dataset.labels[i] for i in indices])
        self.next_step = step + 1

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])


class Classification:
    """Fine-tuning a pre-trained encoder (ours, or timm's) on ``data.classes``, a class folder.

    The class names and their number are public (they shape the model); every training
    image and label is private. The folder is read when the job starts, so that every
    bad input is named before any work: fewer than two classes, a class without training
    images, a validation class absent from training, unreadable images (skipped, counted).
    """

    def __init__(self, cfg: JobConfig, main: bool = True):
        from data.transform import CropFlip, ImageTextTransform
        from trainer.common.probing import folder_files

        self.cfg = cfg
        self.views = cfg.finetune.views
        if not cfg.data.classes:
            raise ValueError("data.source=classes needs data.classes=FOLDER (FOLDER/train/<class>/ and "
                             "FOLDER/val/<class>/, or FOLDER/<class>/)")
        setting = f"data.classes={cfg.data.classes}"
        classes, train, val = folder_files(Path(cfg.data.classes), cfg.eval.val_fraction, cfg.eval.max_per_class,
                                           setting=setting)
        if len(classes) < 2:
            raise ValueError(f"{setting}: {len(classes)} class ({', '.join(classes)}); a classifier needs at "
                             f"least two class folders")
        size = cfg.img_size
        f = cfg.finetune
        crop = CropFlip(seed=cfg.seed, scale=(f.crop, 1.0), flip=f.flip) if f.augment else None
        self.to_pixels = ImageTextTransform(size, lambda s: [0], 1, crop)
        self.train = ClassImages(train, self.to_pixels.decode_size)
        held_out = ClassImages(val, size)
        for split, data in (("training", self.train), ("validation", held_out)):
            if data.skipped.total and main:
                logger.warning("%s: skipped %d unreadable %s images (%s): %s", setting, data.skipped.total, split,
                               dict(data.skipped), "; ".join(data.bad_files[:5]))
        counts = torch.bincount(torch.tensor(self.train.labels, dtype=torch.long), minlength=len(classes))
        if empty := [classes[c] for c in range(len(classes)) if counts[c] == 0]:
            raise ValueError(f"{setting}: classes {empty[:5]} have no readable training images; every class "
                             f"needs some (or remove its folder)")
        if not len(held_out):
            raise ValueError(f"{setting}: no readable validation images")
        self.classes = classes
        evaluate = ImageTextTransform(size, lambda s: [0], 1)
        self.val_pixels = torch.stack([evaluate(image, "")[0] for image in held_out.images])
        self.val_labels = torch.tensor(held_out.labels)
        cfg.model.num_classes = len(classes)  # saved with the config: export rebuilds the model from it

    # -- the trainer's hooks

    def reader(self, sampler) -> ClassReader:
        return ClassReader(self.train, sampler, self.to_pixels, self.views)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Cross-entropy of each view: [b K], example i's views in rows i K .. i K + K - 1."""
        images, labels = batch[0], batch[1]
        return F.cross_entropy(model(images).float(), labels.repeat_interleave(self.views), reduction="none")

    def empty(self) -> tuple[torch.Tensor, ...]:
        size = self.cfg.img_size
        return torch.empty(0, 3, size, size), torch.zeros(0, dtype=torch.long)

    def sample(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        size = self.cfg.img_size
        return (torch.zeros(self.views, 3, size, size, device=device),
                torch.zeros(1, dtype=torch.long, device=device))

    def private_backward(self, engine, loss: torch.Tensor) -> None:
        engine.backward(loss, views=self.views)

    def load_init(self, model: nn.Module, path: str) -> None:
        """The encoder's weights (our checkpoint folder, an exported file, the original layouts,
        a timm state dict); the new head keeps its zeros."""
        load_encoder(model, path)
        if self.cfg.finetune.ema:
            from models.classifier import averages

            with torch.no_grad():
                for p, average in averages(model).values():
                    average.copy_(p)

    def after_step(self, backend) -> None:
        """The parameter average's update (collective: the whole parameters)."""
        decay = self.cfg.finetune.ema
        if not decay:
            return
        from models.classifier import AVERAGE_STEPS, averages

        with backend.gathered() as model, torch.no_grad():
            for p, average in averages(model).values():
                if p.requires_grad:
                    average.lerp_(p.detach().to(average.dtype), 1 - decay)
            getattr(model, AVERAGE_STEPS).add_(1)

    def evaluate(self, backend, device: torch.device, step: int) -> dict[str, Any] | None:
        """Collective (the full state dict); rank 0 judges the model (with the average in its
        parameters' places, if one is kept) on the validation images; None on other ranks."""
        from models.classifier import released

        sd = backend.full_state_dict()
        if not sd:
            return None
        model = build_classifier(self.cfg, average=False)
        model.load_state_dict(released(sd))
        model.to(device).eval()
        logits = torch.cat([model(x.to(device)).float().cpu()
                            for x in self.val_pixels.split(self.cfg.eval.batch_size)])
        n = len(self.classes)
        results: dict[str, Any] = {"top1": _top_k(logits, self.val_labels, 1)}
        if n > 5:
            results["top5"] = _top_k(logits, self.val_labels, 5)
        averaged = bool(self.cfg.finetune.ema) and int(sd.get("average_steps", 0)) > 0
        results["finetune"] = {"data": self.cfg.data.classes, "classes": self.classes, "chance": 1 / n,
                               "train_examples": len(self.train), "val_examples": len(self.val_labels),
                               "layers": self.cfg.finetune.layers, "views": self.views,
                               "ema": self.cfg.finetune.ema, "averaged": averaged, "step": step}
        return results


def _top_k(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    best = logits.topk(k, dim=1).indices
    return (best == labels[:, None]).any(1).float().mean().item()


# --------------------------------------------------------------------------- the classifier

def load_encoder(model: nn.Module, path: str) -> None:
    """``--init`` into a classifier: every weight but the head's, from our checkpoint folder or
    a weights file (ours, an exported classifier's, the original DP-Cap/MAE layouts, timm's)."""
    from models.classifier import Classifier, head_names
    from trainer.common.checkpoints import load_model_weights

    if isinstance(model, Classifier):
        load_model_weights(model.encoder, path, partial(_encoder_layout, model.encoder))
        return
    from trainer.common.checkpoints import read_weights_file

    if not Path(path).is_file():
        raise ValueError(f"{path}: a timm model's --init is a weights file (.pth/.pt/.safetensors, timm's keys)")
    sd = read_weights_file(Path(path))
    heads = head_names(model)
    wanted = {k for k in model.state_dict() if k not in heads and not k.startswith("average_")}
    if missing := sorted(wanted - set(sd)):
        raise ValueError(f"{path}: not weights of this timm model; missing {missing[:5]}")
    model.load_state_dict({k: sd[k] for k in wanted}, strict=False)


def _encoder_layout(encoder: nn.Module, sd: dict) -> dict:
    """An exported classifier's keys (``encoder.``), or the original code's layout."""
    import models

    prefix = "encoder."
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return models.from_original_layout(encoder, sd)


def for_job(cfg: JobConfig, main: bool = True):
    """The job's kind: classification on a class folder, captioning, or masked autoencoding."""
    if cfg.is_classifier:
        return Classification(cfg, main)
    return Captioning(cfg) if cfg.is_captioner else MaskedAutoencoding(cfg)


def log_start(task, main: bool) -> None:
    if isinstance(task, Classification) and main:
        c = task.cfg
        logger.info("fine-tuning on data.classes=%s: %d classes, %d training images (N), %d validation images; "
                    "finetune.layers=%s, %d view%s per example%s", c.data.classes, len(task.classes),
                    len(task.train), len(task.val_labels), c.finetune.layers, task.views,
                    "s" * (task.views > 1), f", parameter average (decay {c.finetune.ema})" if c.finetune.ema else "")
        if len(task.train) < 10 * len(task.classes):
            logger.warning("data.classes: %d training images for %d classes; expect little from so few",
                           len(task.train), len(task.classes))
