"""Vision models for private training: DP-Cap (image captioning) and ViP (MAE).

    model = create_model("dpcap_base")               # or dpcap_nano/tiny/small/large, vip_base
    loss = model(images, tokens)                     # per-example loss [B]
    model = create_model("dpcap_base", img_size=64)  # any config field can be overridden

Models know nothing of privacy or distribution; they return per-example losses
and keep every trainable tensor in a layer the privacy engine has a rule for.
"""

import dataclasses

from torch import nn

from models.dpcap import DPCap, DPCapConfig
from models.dpcap import CONFIGS as _DPCAP_CONFIGS
from models.upstream import (
    convert_mae_state_dict,
    convert_upstream_state_dict,
    to_mae_state_dict,
    to_upstream_state_dict,
)
from models.vip import CONFIGS as _VIP_CONFIGS
from models.vip import ViP, ViPConfig

# name -> (model class, config); the class takes the config as its only argument
REGISTRY: dict[str, tuple[type[nn.Module], object]] = {
    **{name: (DPCap, cfg) for name, cfg in _DPCAP_CONFIGS.items()},
    **{name: (ViP, cfg) for name, cfg in _VIP_CONFIGS.items()},
}


def model_config(name: str, **overrides):
    """The config ``create_model(name, **overrides)`` builds from (``img_size``, ``patch_size``...)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    config = REGISTRY[name][1]
    fields = {f.name for f in dataclasses.fields(config)}
    if unknown := sorted(set(overrides) - fields):
        raise ValueError(f"{name} has no setting {', '.join(unknown)}; settings: {', '.join(sorted(fields))}")
    return dataclasses.replace(config, **overrides)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model, with any config field overridden (``img_size=64``...)."""
    config = model_config(name, **overrides)
    return REGISTRY[name][0](config)


def from_original_layout(model: nn.Module, sd: dict) -> dict:
    """A state dict of the original code (DP-Cap's; MAE's for ViP) in ``model``'s layout."""
    return convert_upstream_state_dict(sd) if isinstance(model, DPCap) else convert_mae_state_dict(sd)


def to_original_layout(model: nn.Module, sd: dict) -> dict:
    """``model``'s state dict in the original code's layout (DP-Cap's; MAE's for ViP)."""
    return to_upstream_state_dict(sd) if isinstance(model, DPCap) else to_mae_state_dict(sd)


__all__ = [
    "REGISTRY", "DPCap", "DPCapConfig", "ViP", "ViPConfig",
    "create_model", "model_config", "convert_upstream_state_dict", "to_upstream_state_dict",
    "convert_mae_state_dict", "to_mae_state_dict", "from_original_layout", "to_original_layout",
]
