"""Job configuration: typed keyword-only dataclasses, presets as functions.

A job is built from a preset (a function returning a :class:`JobConfig`) or a
JSON/YAML file (which may name a ``preset`` to start from), then ``key=value``
overrides with dotted paths (``privacy.noise_multiplier=0.8``,
``ds.train_batch_size=512``, ``model.overrides.depth=4``).

Batch geometry has one source for both backends: the DeepSpeed config named by
``ds_config`` (``train_batch_size`` is the expected logical batch B,
``train_micro_batch_size_per_gpu`` the largest physical micro-batch,
``gradient_accumulation_steps`` optional, ``bf16.enabled``). It is loaded into
``JobConfig.ds`` and can be overridden with ``ds.KEY=VALUE``; with
``backend=deepspeed`` the rest of it (``zero_optimization``, ``optimizer``, ...)
goes to ``deepspeed.initialize``. Nothing here checks a config: that is
``trainer.job.validation``, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DS_CONFIG_DIR = REPO_ROOT / "ds_configs"

TIMM = "timm:"  # model.name=timm:NAME: a timm model, weights from --init (never downloaded)


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "dpcap_nano"  # a models.create_model name
    overrides: dict[str, Any] = field(default_factory=dict)  # create_model keyword overrides
    mask_ratio: float = 0.75  # ViP only: fraction of patches masked
    num_classes: int = 0  # a classifier's (data.source=classes): set from the class folder


@dataclass(kw_only=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic": write shards from data.synthetic first; "shards": use `shards`
    # tar shards from any webdataset writer: a folder (with or without index.json), a glob
    # ("/data/laion/*.tar") or a brace pattern ("/data/laion/{00000..23380}.tar"); indexed once
    # if need be ("" with synthetic: runs/<name>/shards)
    shards: str = ""
    # N, the data set size (q = B / N): synthetic: how many to write; shards: checked against
    # the shards' index, or 0 to take it from the index
    num_examples: int = 0
    heldout_examples: int = 256  # synthetic held-out images for zero-shot evaluation
    text_length: int = 16  # caption tokens, [CLS] ... [SEP] and padding
    num_workers: int = 0  # DataLoader worker processes per rank
    # with workers: how long a rank waits for one micro-batch before it fails (a stuck worker,
    # a hung file system) instead of waiting forever; 0: no limit
    worker_timeout_s: float = 600.0
    seed: int = 0  # synthetic data seed (not the sampling seed: that is JobConfig.seed)
    # training images only: MAE's random resized crop (scale 0.2-1) and horizontal flip,
    # random from (JobConfig.seed, step, example); off for DP-Cap, whose captions name positions
    augment: bool = False
    # source "classes": a class folder to fine-tune on, FOLDER/train/<class>/ and FOLDER/val/<class>/,
    # or FOLDER/<class>/ split by a hash of the file names (eval.val_fraction held out)
    classes: str = ""


@dataclass(kw_only=True)
class PrivacyConfig:
    enabled: bool = True  # False needs the --allow-non-private flag
    noise_multiplier: float | None = None  # sigma; None: calibrated to target_epsilon
    target_epsilon: float | None = None  # calibration target and, always, a budget guard
    delta: float | None = None  # None: 1 / N
    max_grad_norm: float = 1.0  # C, flat clipping over all trainable parameters
    accountant: str = "rdp"  # "rdp" or "pld": used for calibration and the guard
    # TAN simulation: train at ds.train_batch_size = B' with sigma' = sigma * B' / B_ref;
    # noise_multiplier / target_epsilon describe the reference run at B_ref.
    tan_reference_batch: int | None = None
    allow_privacy_change: bool = False  # on resume, accept changed sigma/q/delta (composed)
    # Seeds the noise and the Poisson sampling, which must both stay secret: the guarantee
    # assumes nobody can tell which steps drew an example. None: a secret random seed
    # (saved in the checkpoint). A fixed seed reveals noise and batches to anyone who knows
    # it: for reproducing runs and tests, never for releases.
    secret_seed: int | None = None


@dataclass(kw_only=True)
class OptimConfig:
    blr: float = 1e-7  # lr = blr * B_ref / 256 (B_ref: the TAN reference batch, else B)
    lr: float | None = None  # absolute lr; overrides blr
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.005
    warmup_steps: int = 0  # linear warmup from 0
    decay_steps: int | None = None  # cosine horizon (None: the training steps)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr


@dataclass(kw_only=True)
class CheckpointConfig:
    dir: str = ""  # "" : runs/<name>/checkpoints
    every_steps: int = 0  # 0: only at the end (and on SIGTERM/SIGUSR1)
    keep_last: int = 2
    resume: bool = True  # resume from the latest checkpoint in dir if there is one
    # a job holds dir's lock; one whose lease (renewed at every save) is older is taken over
    lock_lease_s: float = 4 * 3600.0


@dataclass(kw_only=True)
class MetricsConfig:
    log_dir: str = ""  # "" : runs/<name>/tb
    log_every: int = 10  # TensorBoard scalars every N steps
    pld_every: int = 100  # PLD epsilon every N steps (RDP at every log)
    num_captions: int = 4  # fixed held-out images captioned into TensorBoard
    caption_every: int = 0  # 0: only at the end
    progress: bool = True  # rank-0 progress bar


@dataclass(kw_only=True)
class EvalConfig:
    """The end-of-job evaluation: on held-out synthetic images when training on synthetic
    data, and on ``data``, a folder of your classes, whatever the training data."""

    # zero-shot accuracy (synthetic tasks; eval.data's classes): a captioner's (DP-Cap) only, as ViP
    # has no text side; None follows the model (load_config sets it: on for DP-Cap, off for ViP)
    zero_shot: bool | None = None
    probe: bool = True  # either model: linear probe of the encoder (and k-shot probes on eval.data)
    tasks: list[str] = field(default_factory=lambda: ["colour", "shape", "object"])  # synthetic tasks
    batch_size: int = 64
    # class folders: FOLDER/train/<class>/ and FOLDER/val/<class>/, or FOLDER/<class>/ (split
    # by val_fraction); the folder names are the zero-shot labels ("_" read as a space)
    data: str = ""
    prompt: str = "this is a photo of a"  # zero-shot on eval.data: the text before the label
    methods: list[str] = field(default_factory=lambda: ["trie", "loss"])  # zero-shot scoring on eval.data
    shots: list[int] = field(default_factory=lambda: [1, 5, 10])  # k-shot probes on eval.data
    trials: int = 5  # draws of k examples per class, per k
    val_fraction: float = 0.5  # FOLDER/<class>/ layout: each class's share held out to test
    max_per_class: int = 0  # > 0: at most this many images of each class per split


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning a pre-trained encoder on a class folder (``data.source=classes``)."""

    layers: str = "head"  # what trains: "head" (a linear probe), "last:K" (last K blocks + head), "all"
    views: int = 1  # augmentation multiplicity: K augmented views per example, gradients averaged before clipping
    augment: bool = True  # a random crop and horizontal flip of each training view
    crop: float = 0.8  # the smallest crop, as a share of the image's area (the largest: all of it)
    flip: bool = True  # false: crops only (images a mirror changes: digits, text)
    ema: float = 0.0  # decay of the parameter average that is evaluated and exported (0: none)
    eval_every: int = 0  # evaluate on the validation images every N steps (0: only at the end)


@dataclass(kw_only=True)
class JobConfig:
    name: str = "default"
    # the sharding engine: "fsdp2" (torch FSDP2 + DCP checkpoints) or "deepspeed"
    # (deepspeed.initialize with the ds config: ZeRO stage, offload, bf16, optimizer)
    backend: str = "fsdp2"
    ds_config: str = "default.json"  # file in ds_configs/ (or a path): a DeepSpeed config
    ds: dict[str, Any] = field(default_factory=dict)  # loaded from ds_config; overridable
    steps: int = 100  # logical (privacy) steps
    seed: int = 0  # shared by all ranks: init, and sampling when privacy is off (private runs use privacy.secret_seed)
    # how long a rank waits at any collective (a peer that died or hangs) before the job fails;
    # torch's own defaults are 30 min (gloo) and 10 min (NCCL). First-time indexing of a very large
    # shard set, or saves of a very large model to a slow file system, may need more
    collective_timeout_s: float = 900.0
    init: str = ""  # weights-only initialisation (ours, DCP dir, or an original-layout DP-Cap .pth)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    @property
    def run_dir(self) -> Path:
        return Path("runs") / self.name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def log_dir(self) -> Path:
        return Path(self.metrics.log_dir) if self.metrics.log_dir else self.run_dir / "tb"

    @property
    def img_size(self) -> int:
        """The model's input side in pixels: ``model.overrides.img_size``, else the model's own
        default (``models.model_config``); what the data, the held-out images and the model agree on."""
        if "img_size" in self.model.overrides:
            return self.model.overrides["img_size"]
        if self.model.name.startswith(TIMM):  # timm's own models: their usual input side
            return 224
        from models import model_config

        return model_config(self.model.name).img_size

    @property
    def is_captioner(self) -> bool:
        return self.model.name.startswith("dpcap") and not self.is_classifier

    @property
    def is_classifier(self) -> bool:
        return self.data.source == "classes"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- presets

def _ds(name: str) -> dict[str, Any]:
    path = Path(name)
    if not path.is_absolute() and not path.exists():
        path = DS_CONFIG_DIR / name
    if not path.exists():
        raise ValueError(f"ds_config {name!r} not found (looked in {DS_CONFIG_DIR})")
    return _parsed_tree(lambda: json.loads(path.read_text()), f"ds_config {path}")


def default_for_this_machine() -> JobConfig:
    """The ``default`` preset (./launch.sh's job): :func:`default_gpu` where CUDA is available,
    else :func:`default_cpu`; the log says which. Name either preset for the same job everywhere."""
    import torch

    gpu = torch.cuda.is_available()
    logger.info("--config default: %s on this machine (CUDA %s)", "default_gpu" if gpu else "default_cpu",
                "available" if gpu else "not available")
    return default_gpu() if gpu else default_cpu()


def default_cpu() -> JobConfig:
    """A small DP-Cap on synthetic captions, private, minutes on a CPU."""
    return JobConfig(
        name="default",
        ds_config="default.json",  # B = 512, micro-batches of 128
        steps=400,
        model=ModelConfig(
            name="dpcap_nano",
            overrides=dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3,
                           decoder_embed_dim=96, decoder_depth=2, decoder_num_heads=3),
        ),
        data=DataConfig(source="synthetic", num_examples=50_000,
                        heldout_examples=300, text_length=16),
        # epsilon 8 at delta = 1/N by PLD (the tight accountant; RDP says about 9.6)
        privacy=PrivacyConfig(target_epsilon=8.0, max_grad_norm=1.0, accountant="pld"),
        optim=OptimConfig(lr=4e-3, warmup_steps=40, weight_decay=0.005),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
        metrics=MetricsConfig(log_every=10, pld_every=50),
    )


def default_gpu() -> JobConfig:
    """The default job on a GPU: a larger DP-Cap, larger images and batch."""
    return JobConfig(
        name="default",
        ds_config="default_gpu.json",
        steps=1000,
        model=ModelConfig(name="dpcap_nano", overrides=dict(img_size=64, patch_size=8)),
        data=DataConfig(source="synthetic", num_examples=200_000,
                        heldout_examples=1000, text_length=16, num_workers=4),
        privacy=PrivacyConfig(target_epsilon=8.0, max_grad_norm=1.0, accountant="pld"),
        optim=OptimConfig(lr=2e-3, warmup_steps=100),
        checkpoint=CheckpointConfig(every_steps=250, keep_last=2),
        metrics=MetricsConfig(log_every=10, pld_every=100),
    )


def dpcap_paper(model: str = "dpcap_base") -> JobConfig:
    """DP-Cap paper recipe (ICML 2024): B=1,310,720, sigma 0.728, C=1, 5708 steps on 233.8M pairs."""
    n = 233_804_767
    return JobConfig(
        name=f"{model}_paper",
        ds_config="dpcap_paper.json",
        steps=5708,
        model=ModelConfig(name=model),
        data=DataConfig(source="shards", shards="", num_examples=n, text_length=40, num_workers=8),
        privacy=PrivacyConfig(noise_multiplier=0.728, max_grad_norm=1.0, delta=1.0 / n),
        optim=OptimConfig(blr=1e-7, betas=(0.9, 0.95), weight_decay=0.005,
                          warmup_steps=2000, decay_steps=10_000),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=3),
        metrics=MetricsConfig(log_every=1, pld_every=50, caption_every=500),
    )


def dpcap_paper_target_epsilon() -> JobConfig:
    """The paper recipe with sigma calibrated to epsilon 8 (RDP) instead of given."""
    cfg = dpcap_paper()
    cfg.name = "dpcap_base_eps8"
    cfg.privacy.noise_multiplier = None
    cfg.privacy.target_epsilon = 8.0
    return cfg


def dpcap_paper_tan64() -> JobConfig:
    """TAN simulation of the paper run at B' = B/64 (sigma' = sigma/64, lr from B)."""
    cfg = dpcap_paper()
    cfg.name = "dpcap_base_tan64"
    cfg.ds_config = "dpcap_tan64.json"
    cfg.privacy.tan_reference_batch = 1_310_720
    return cfg


def vip_stage1() -> JobConfig:
    """ViP step 1: non-private MAE on synthetic images (needs --allow-non-private)."""
    return JobConfig(
        name="vip_stage1",
        ds_config="vip_stage1.json",
        steps=5000,
        model=ModelConfig(name="vip_base", mask_ratio=0.75),
        data=DataConfig(source="synthetic", num_examples=100_000, num_workers=8, augment=True),
        privacy=PrivacyConfig(enabled=False),
        optim=OptimConfig(blr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05, warmup_steps=500),
        checkpoint=CheckpointConfig(every_steps=500),
    )


def vip_stage2() -> JobConfig:
    """ViP step 2: private MAE from stage 1 (B=81,920, sigma 0.5, C=0.1, 10,000 steps)."""
    return JobConfig(
        name="vip_stage2",
        ds_config="vip.json",
        steps=10_000,
        init="runs/vip_stage1/checkpoints",
        model=ModelConfig(name="vip_base", mask_ratio=0.75),
        data=DataConfig(source="shards", shards="", num_examples=233_804_767, num_workers=8, augment=True),
        privacy=PrivacyConfig(noise_multiplier=0.5, max_grad_norm=0.1),
        optim=OptimConfig(blr=1.5e-5, betas=(0.9, 0.95), weight_decay=0.005, warmup_steps=1000),
        checkpoint=CheckpointConfig(every_steps=200, keep_last=3),
    )


def dpcap_own() -> JobConfig:
    """The default job's DP-Cap (default_cpu's, minutes on a CPU; default_gpu's where CUDA is
    available) on your captioned shards: N from their index, the full BERT vocabulary,
    epsilon 8 (PLD); add eval.data=FOLDER to judge it."""
    cfg = default_for_this_machine()
    cfg.name = "dpcap_own"
    cfg.data = DataConfig(source="shards", text_length=cfg.data.text_length, num_workers=cfg.data.num_workers)
    return cfg


def vip_own() -> JobConfig:
    """A CPU-sized ViP trained privately on your images (captions not needed): N from the
    shards' index, epsilon 8 (PLD), MAE's crops; add eval.data=FOLDER for its probes."""
    return JobConfig(
        name="vip_own",
        ds_config="default.json",  # B = 512, micro-batches of 128
        steps=400,
        model=ModelConfig(name="vip_base", mask_ratio=0.75,
                          overrides=dict(img_size=32, patch_size=8, embed_dim=96, depth=3, num_heads=3,
                                         decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)),
        data=DataConfig(source="shards", augment=True),
        privacy=PrivacyConfig(target_epsilon=8.0, max_grad_norm=1.0, accountant="pld"),
        optim=OptimConfig(lr=2e-3, warmup_steps=40, weight_decay=0.005),
        checkpoint=CheckpointConfig(every_steps=100, keep_last=2),
        metrics=MetricsConfig(log_every=10, pld_every=50),
    )


def finetune_own() -> JobConfig:
    """Fine-tune the default job's DP-Cap encoder (--init) privately on your class folder
    (data.classes=FOLDER): a linear head on frozen features, epsilon 8 (PLD), N the folder's
    training images; finetune.layers=all (or last:K) trains the encoder too."""
    cfg = default_for_this_machine()
    cfg.name = "finetune_own"
    cfg.ds_config = "finetune.json"  # B = 32 (a small folder: N >= 32), micro-batches of 32
    cfg.steps = 200
    cfg.data = DataConfig(source="classes", text_length=cfg.data.text_length)
    cfg.optim = OptimConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0)
    cfg.checkpoint = CheckpointConfig(every_steps=100, keep_last=2)
    cfg.eval = EvalConfig(zero_shot=False, probe=False, val_fraction=0.2)
    return cfg


def _paper(model: str) -> Callable[[], JobConfig]:
    return lambda: dpcap_paper(model)


PRESETS: dict[str, Callable[[], JobConfig]] = {
    "default": default_for_this_machine,
    "default_cpu": default_cpu,
    "default_gpu": default_gpu,
    **{f"{m}_paper": _paper(m) for m in
       ("dpcap_nano", "dpcap_tiny", "dpcap_small", "dpcap_base", "dpcap_large")},
    "dpcap_base_eps8": dpcap_paper_target_epsilon,
    "dpcap_base_tan64": dpcap_paper_tan64,
    "vip_stage1": vip_stage1,
    "vip_stage2": vip_stage2,
    "dpcap_own": dpcap_own,
    "vip_own": vip_own,
    "finetune_own": finetune_own,
}
# presets renamed so that no preset is called like a model (``vip_base`` is also models' name)
RENAMED_PRESETS = {"vip_base": "vip_stage2"}


# --------------------------------------------------------------------------- loading

def load_config(name_or_file: str, overrides: list[str] = ()) -> JobConfig:
    """A preset name or a JSON/YAML file, then dotted ``key=value`` overrides.

    ``ds`` is loaded from ``ds_config`` after the other overrides (so
    ``ds_config=other.json`` works); ``ds.KEY=VALUE`` overrides apply last.
    """
    if name_or_file in PRESETS:
        cfg = PRESETS[name_or_file]()
    elif name_or_file in RENAMED_PRESETS and not Path(name_or_file).is_file():
        raise ValueError(_renamed(name_or_file, "--config"))
    elif Path(name_or_file).is_file():
        cfg = _from_file(Path(name_or_file))
    else:
        raise ValueError(f"--config {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) "
                         f"nor an existing .json/.yaml file")
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must be key=value (e.g. privacy.noise_multiplier=0.8)")
        key, value = item.split("=", 1)
        parsed.append((key.strip(), _parse_value(value)))
    for key, value in parsed:
        if not key.startswith("ds."):
            _set(cfg, key, value)
    cfg.ds = {**_ds(cfg.ds_config), **cfg.ds}
    for key, value in parsed:
        if key.startswith("ds."):
            _set(cfg, key, value)
    _follow_model(cfg)
    return cfg


def _renamed(preset: str, where: str) -> str:
    new = RENAMED_PRESETS[preset]
    return (f"{where} {preset}: the preset is now called {new} ({preset} names the model; "
            f"--config {new}, or model.name={preset} in another preset)")


def _follow_model(cfg: JobConfig) -> None:
    """Settings whose default depends on the model, once the model is known (after overrides)."""
    if cfg.eval.zero_shot is None:
        cfg.eval.zero_shot = cfg.is_captioner
    elif not isinstance(cfg.eval.zero_shot, bool):
        raise ValueError(f"eval.zero_shot must be true, false or null (the model's default), got "
                         f"{cfg.eval.zero_shot!r}")


def _from_file(path: Path) -> JobConfig:
    text = path.read_text()
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    if path.suffix == ".json":
        raw = _parsed_tree(lambda: json.loads(text), f"config file {path}")
    else:
        import yaml

        raw = _parsed_tree(lambda: yaml.safe_load(text), f"config file {path}")
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset in RENAMED_PRESETS:
        raise ValueError(_renamed(preset, f"{path}: preset"))
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"{path}: unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    cfg = PRESETS[preset]() if preset else JobConfig()
    _merge(cfg, raw, prefix="")
    return cfg


MAX_DEPTH = 64  # no config (nor meta.json) nests deeper; deeper would exhaust the stack somewhere later


def _parsed_tree(parse: Callable[[], Any], what: str) -> Any:
    """``parse()``'s JSON/YAML tree, or a ValueError naming ``what`` if it nests deeper than
    :data:`MAX_DEPTH`: deeper than the stack, parsing itself raises RecursionError; less deep
    but still deep, recursive code (dataclasses.asdict, json.dump) would fail far from where
    the tree came in."""
    deep = ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    try:
        tree = parse()
    except RecursionError:
        raise deep from None
    level = [tree]
    for _ in range(MAX_DEPTH + 1):
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node)]
        if not level:
            return tree
    raise deep


def _merge(obj: Any, raw: dict[str, Any], prefix: str) -> None:
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if dataclasses.is_dataclass(obj) and key in {f.name for f in dataclasses.fields(obj)}:
            current = getattr(obj, key)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                _merge(current, value, prefix=path + ".")
                continue
        _set(obj, key, value, full_key=path)


def _set(cfg: Any, key: str, value: Any, full_key: str | None = None) -> None:
    full_key = full_key or key
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        if isinstance(obj, dict):
            obj = obj.setdefault(part, {})
        elif dataclasses.is_dataclass(obj) and hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise ValueError(f"unknown config key {full_key!r} ({part!r} is not a section)")
    last = parts[-1]
    if isinstance(obj, dict):
        obj[last] = value
        return
    names = {f.name: f for f in dataclasses.fields(obj)}
    if last not in names:
        raise ValueError(f"unknown config key {full_key!r}; valid here: {', '.join(names)}")
    setattr(obj, last, _coerce(getattr(obj, last), value, full_key))


def _coerce(current: Any, value: Any, key: str) -> Any:
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(current, (int, float, str, dict)) and not isinstance(value, type(current)):
        raise ValueError(f"{key} must be a {type(current).__name__}, got {value!r}")
    return value


def _parse_value(text: str) -> Any:
    import yaml

    try:
        value = _parsed_tree(lambda: yaml.safe_load(text), f"override value {text[:20]!r}")
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:  # YAML 1.1 reads 4e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------- derived values

def reference_batch(cfg: JobConfig) -> int:
    """The batch the lr and (TAN) the noise are defined for."""
    return cfg.privacy.tan_reference_batch or int(cfg.ds["train_batch_size"])


def learning_rate(cfg: JobConfig) -> float:
    """The peak learning rate: optim.lr, or optim.blr scaled by the reference batch."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.blr * reference_batch(cfg) / 256


def delta_of(cfg: JobConfig) -> float:
    return cfg.privacy.delta if cfg.privacy.delta is not None else 1.0 / cfg.data.num_examples
