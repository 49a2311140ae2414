"""The per-layer rules and the default registry (layer class -> rule).

The engine owns its registry (a copy of :data:`DEFAULT_RULES` unless given
one) and looks a layer up along ``type(layer).__mro__``, so a subclass of
``nn.Linear`` gets the Linear rule; a subclass that overrides ``forward`` is
refused, because the rule would replace that forward, unless the subclass is
registered itself.

A key is a class or a class's qualified name (``module.QualName``): timm's
layers are registered by name, so that ``privacy/`` never imports timm. Each
was read in timm 1.0's source (``timm/layers/norm.py``, ``layer_scale.py``, ``linear.py``):
its forward computes what its rule's forward computes (the fast-norm paths
too), and tests/test_privacy_rules.py checks every rule against torch.func on
the installed timm's own modules.
"""

from torch import nn

from privacy.layers import AddedParameter
from privacy.rules.added import AddedParameterRule
from privacy.rules.attention import MultiheadAttentionRule
from privacy.rules.base import Call, ChannelsFirst, LayerPlan, Rule
from privacy.rules.conv import ConvRule
from privacy.rules.embedding import EmbeddingRule
from privacy.rules.layernorm import DataFormatLayerNormRule, LayerNormRule
from privacy.rules.linear import LinearRule
from privacy.rules.norms import GroupNormRule, RMSNormRule
from privacy.rules.scale import ScaleRule

RuleKey = type[nn.Module] | str

DEFAULT_RULES: dict[RuleKey, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.RMSNorm: RMSNormRule(),
    nn.MultiheadAttention: MultiheadAttentionRule(),
    AddedParameter: AddedParameterRule(),
    # timm 1.0: F.layer_norm, F.group_norm and rms_norm as their torch counterparts (or
    # over dim 1 of NCHW: "2d"); LayerScale: x * gamma over the last dim, LayerScale2d over dim 1
    "timm.layers.linear.Linear": LinearRule(),  # F.linear (casts to the input's dtype only when scripted)
    "timm.layers.norm.LayerNorm": LayerNormRule(),
    "timm.layers.norm.LayerNorm2d": ChannelsFirst(LayerNormRule()),
    "timm.layers.norm.GroupNorm": GroupNormRule(),
    "timm.layers.norm.GroupNorm1": GroupNormRule(),
    "timm.layers.norm.RmsNorm": RMSNormRule(),
    "timm.layers.norm.RmsNorm2d": ChannelsFirst(RMSNormRule()),
    "timm.layers.layer_scale.LayerScale": ScaleRule(channel_dim=-1),
    "timm.layers.layer_scale.LayerScale2d": ScaleRule(channel_dim=1),
    # torchvision 0.2x: F.layer_norm over the channels of NCHW (permuted to the last dim and back)
    "torchvision.models.convnext.LayerNorm2d": ChannelsFirst(LayerNormRule()),
    # transformers 5: nn.LayerNorm's forward, permuted as above where data_format is "channels_first"
    "transformers.models.convnext.modeling_convnext.ConvNextLayerNorm": DataFormatLayerNormRule(),
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2LayerNorm": DataFormatLayerNormRule(),
    "transformers.models.dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayerNorm":
        DataFormatLayerNormRule(),
}


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def find_rule(module: nn.Module, rules: dict[RuleKey, Rule]) -> tuple[type[nn.Module], Rule] | None:
    """The registered class nearest in ``type(module).__mro__`` (by class or by
    qualified name) and its rule."""
    for cls in type(module).__mro__:
        if cls in rules:
            return cls, rules[cls]
        name = qualified_name(cls)
        if name in rules:
            return cls, rules[name]
    return None


__all__ = ["Call", "LayerPlan", "Rule", "RuleKey", "DEFAULT_RULES", "find_rule", "qualified_name"]
