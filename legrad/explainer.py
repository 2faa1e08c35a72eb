"""Alias of :mod:`legrad.frontend.explainer`, kept for compatibility."""

from .frontend.explainer import MAX_TOKENS, Explainer, Explanation, clean_prompts, clean_targets

__all__ = ["Explainer", "Explanation", "clean_prompts", "clean_targets", "MAX_TOKENS"]
