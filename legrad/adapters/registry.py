"""The one registry of tower adapters: :func:`register_tower`, :func:`tower_adapter_for`,
:func:`supported_tower_names`.

Built-in families are listed by module path and imported on first use, so that ``import legrad``
stays light; none of their modules imports its optional library (timm, transformers, torchvision) at
import time either. Adapters registered with :func:`register_tower` are tried first, newest first.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from .base import UNSUPPORTED_HINT, TowerAdapter

__all__ = ["register_tower", "unregister_tower", "tower_adapter_for", "supported_tower_names", "adapter_classes",
           "unwrap_compiled", "is_compiled"]

# (module, adapter classes) in lookup order. Classifiers first: they match the model itself, and the
# transformers CLIP/SigLIP adapters refuse every other transformers class.
_BUILTIN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("legrad.adapters.classifiers.hf", ("HFViTClassifierAdapter",)),
    ("legrad.adapters.classifiers.torchvision", ("TorchvisionViTAdapter",)),
    ("legrad.adapters.classifiers.timm",
     ("TimmDistilledClassifierAdapter", "TimmMapClassifierAdapter", "TimmClassifierAdapter")),
    ("legrad.adapters.vlm", ("LlavaNextAdapter", "LlavaAdapter", "PaliGemmaAdapter", "Qwen2VLAdapter",
                             "Qwen2_5_VLAdapter", "Qwen3_5Adapter", "Qwen3VLAdapter", "InternVLAdapter",
                             "LlavaOnevisionAdapter", "Gemma3Adapter", "SmolVLMAdapter", "Idefics3Adapter",
                             "Mistral3Adapter")),
    ("legrad.adapters.hf.siglip", ("HFSiglip2Adapter", "HFSiglipAdapter")),
    ("legrad.adapters.hf.clip", ("HFClipAdapter",)),
    ("legrad.adapters.openclip", ("OpenClipViTAdapter", "OpenClipCoCaAdapter")),
    ("legrad.adapters.timm", ("TimmViTAdapter", "TimmMapAdapter")),
)

_registered: list[type[TowerAdapter]] = []


def register_tower(cls: type[TowerAdapter]) -> type[TowerAdapter]:
    """Class decorator registering a :class:`~legrad.TowerAdapter` (checked before the built-in ones)."""
    if not (isinstance(cls, type) and issubclass(cls, TowerAdapter)):
        raise TypeError(f"register_tower expects a TowerAdapter subclass, got {cls!r}")
    _registered.insert(0, cls)
    return cls


def unregister_tower(cls: type[TowerAdapter]) -> None:
    """Removes an adapter added by :func:`register_tower` (nothing happens if it is not registered)."""
    while cls in _registered:
        _registered.remove(cls)


def adapter_classes() -> list[type[TowerAdapter]]:
    """Every adapter class, in lookup order (registered ones first)."""
    builtin = []
    for module, names in _BUILTIN:
        mod = importlib.import_module(module)
        builtin.extend(getattr(mod, n) for n in names)
    return [*_registered, *builtin]


def supported_tower_names() -> list[str]:
    """Names of the tower families that have an adapter."""
    return [t.family for t in adapter_classes()]


def is_compiled(module: Any) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper (``torch._dynamo``'s ``OptimizedModule``)."""
    # Looked up, not imported: torch._dynamo is heavy, and a module compiled by torch.compile implies it is loaded.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    cls = getattr(eval_frame, "OptimizedModule", None)
    return cls is not None and isinstance(module, cls)


def unwrap_compiled(model: Any) -> Any:
    """The module a ``torch.compile`` wrapper compiles (``_orig_mod``, through nested wrappers), else ``model``.

    legrad re-runs the tower statelessly from the module's weights, so the compiled graph is never used;
    unwrapping keeps it from being traced or compiled by legrad's own calls. The compiled wrapper shares its
    parameters with ``_orig_mod``, so nothing is copied.
    """
    while is_compiled(model):
        model = model._orig_mod
    return model


def tower_adapter_for(model: Any) -> TowerAdapter:
    """Builds the adapter for a model's image tower (a ``torch.compile``'d model: its original module's).

    Raises:
        TypeError: naming the tower and the supported families when none matches.
    """
    model = unwrap_compiled(model)
    for cls in adapter_classes():
        try:
            adapter = cls.from_model(model)
        except ImportError:  # an optional dependency of that family is missing
            continue
        if adapter is not None:
            return adapter
    tower = getattr(model, "visual", model)
    compiled = [name for name, module in model.named_modules() if is_compiled(module)] \
        if hasattr(model, "named_modules") else []
    if compiled:
        raise TypeError(
            f"the model's submodule {compiled[0]!r} is a torch.compile'd module (OptimizedModule): LeGrad re-runs "
            "the image tower from its modules' weights and cannot see through a compiled part; wrap the "
            "uncompiled model (compiling the whole model instead is fine: LeWrapper unwraps it), e.g. restore "
            f"model.{compiled[0]} = model.{compiled[0]}._orig_mod"
        )
    raise TypeError(
        f"unsupported image tower {type(tower).__module__}.{type(tower).__name__}. "
        f"{UNSUPPORTED_HINT} Supported families: {', '.join(supported_tower_names())}."
    )
