"""Image-classifier adapters (timm, torchvision, transformers): see :mod:`legrad.classifiers`."""

from .base import ClassifierAdapter
from .hf import HFViTClassifierAdapter
from .timm import TimmClassifierAdapter, TimmDistilledClassifierAdapter, TimmMapClassifierAdapter
from .torchvision import TorchvisionViTAdapter

__all__ = ["ClassifierAdapter", "TimmClassifierAdapter", "TimmMapClassifierAdapter",
           "TimmDistilledClassifierAdapter", "TorchvisionViTAdapter", "HFViTClassifierAdapter"]
