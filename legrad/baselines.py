"""Alias of :mod:`legrad.eval.baselines` (the baseline explainability methods), kept for compatibility."""

from .eval.baselines import (
    METHODS,
    Method,
    attention_rollout,
    chefercam,
    get_method,
    gradcam,
    legrad,
    raw_attention,
)

__all__ = ["METHODS", "Method", "attention_rollout", "chefercam", "get_method", "gradcam", "legrad", "raw_attention"]
