"""legrad: LeGrad explainability heatmaps for vision-language Vision Transformers (OpenCLIP).

Usage::

    model = LeWrapper(open_clip_model)            # layer_index=-2 by default
    maps = model.compute_legrad(text_embedding, image=images)   # [B, P, H, W] in [0, 1]
"""

from . import classifier_towers as _classifier_towers  # noqa: F401  registers the image-classifier adapters
from . import hf as _hf  # noqa: F401  registers the Hugging Face adapters (transformers is imported lazily)
from .preprocess import LePreprocess
from .pretrained import list_pretrained
from .towers import LayerStep, TowerAdapter, register_tower, supported_tower_names
from .wrapper import LeWrapper

__version__ = "2.0.0"

__all__ = [
    "LeWrapper",
    "LePreprocess",
    "list_pretrained",
    "LayerStep",
    "TowerAdapter",
    "register_tower",
    "supported_tower_names",
    "__version__",
]
