"""The per-layer rules and the default registry (layer class -> rule).

The engine owns its registry (a copy of :data:`DEFAULT_RULES` unless given
one) and looks a layer up along ``type(layer).__mro__``, so a subclass of
``nn.Linear`` gets the Linear rule; a subclass that overrides ``forward`` is
refused, because the rule would replace that forward.
"""

from torch import nn

from privacy.layers import AddedParameter
from privacy.rules.added import AddedParameterRule
from privacy.rules.base import Call, LayerPlan, Rule
from privacy.rules.conv import Conv2dRule
from privacy.rules.embedding import EmbeddingRule
from privacy.rules.layernorm import LayerNormRule
from privacy.rules.linear import LinearRule

DEFAULT_RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv2d: Conv2dRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    AddedParameter: AddedParameterRule(),
}


def find_rule(module: nn.Module, rules: dict[type[nn.Module], Rule]) -> tuple[type[nn.Module], Rule] | None:
    """The registered class nearest in ``type(module).__mro__`` and its rule."""
    for cls in type(module).__mro__:
        if cls in rules:
            return cls, rules[cls]
    return None


__all__ = ["Call", "LayerPlan", "Rule", "DEFAULT_RULES", "find_rule"]
