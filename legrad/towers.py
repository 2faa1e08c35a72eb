"""Alias of :mod:`legrad.adapters` (the adapter protocol, the registry and the open_clip adapters), kept for
compatibility; new code imports from :mod:`legrad` or :mod:`legrad.adapters`."""

from .adapters.base import UNSUPPORTED_HINT, LayerStep, TowerAdapter
from .adapters.openclip import OpenClipCoCaAdapter, OpenClipViTAdapter
from .adapters.registry import register_tower, supported_tower_names, tower_adapter_for

__all__ = ["LayerStep", "TowerAdapter", "OpenClipViTAdapter", "OpenClipCoCaAdapter", "register_tower",
           "tower_adapter_for", "supported_tower_names", "UNSUPPORTED_HINT"]
