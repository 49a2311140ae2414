"""Differential privacy for training: clipping engine, accounting, Poisson sampling."""

from privacy.engine import PrivacyEngine
from privacy.layers import AddedParameter
from privacy.reducer import GradReducer, LocalReducer

__all__ = ["PrivacyEngine", "AddedParameter", "GradReducer", "LocalReducer"]
