"""Stateless application of a tower's sub-modules from their own weights.

LeGrad re-runs parts of the image tower outside the modules' ``forward`` so that the attention
probabilities become reachable and so that eval semantics (no dropout, no drop-path) hold whatever
mode the model is in. Everything here reads parameters (detached: no weight gradients are ever
recorded) and never writes to a module.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["param", "apply_module", "linear", "layer_norm", "eval_view"]

# Modules whose forward is a pure function of their input (no parameters, no train-mode behaviour).
_STATELESS = (
    nn.GELU,
    nn.SiLU,
    nn.ReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardswish,
    nn.Mish,
)


def param(p: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Returns a detached view of a parameter in ``dtype`` (a copy only when the dtype differs)."""
    if p is None:
        return None
    return p.detach().to(dtype)


def linear(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` computed from detached weights in ``x``'s dtype."""
    return F.linear(x, param(mod.weight, x.dtype), param(mod.bias, x.dtype))


def layer_norm(mod: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)`` for any ``nn.LayerNorm`` subclass, computed in float32 at least, returned in ``x``'s dtype."""
    work = torch.promote_types(x.dtype, torch.float32)
    y = F.layer_norm(
        x.to(work),
        mod.normalized_shape,
        param(mod.weight, work),
        param(mod.bias, work),
        mod.eps,
    )
    return y.to(x.dtype)


def _rms_norm(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    work = torch.promote_types(x.dtype, torch.float32)
    y = F.rms_norm(x.to(work), mod.normalized_shape, param(getattr(mod, "weight", None), work), mod.eps)
    return y.to(x.dtype)


def _layer_scale(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gamma = getattr(mod, "gamma", None)
    if gamma is None:
        gamma = mod.weight
    return x * param(gamma, x.dtype)


def _is_layer_scale(mod: nn.Module) -> bool:
    # open_clip.transformer.LayerScale and timm.layers.LayerScale: a per-channel gain, nothing else.
    return type(mod).__name__ == "LayerScale" and (hasattr(mod, "gamma") or hasattr(mod, "weight"))


def apply_module(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Applies a sub-module with eval semantics, from detached weights, in ``x``'s dtype.

    Args:
        mod: a norm, linear, activation, dropout, identity, layer-scale or ``nn.Sequential`` of these.
        x: input tensor ``[..., C]``.

    Returns:
        The module's eval-mode output for ``x``.

    Raises:
        TypeError: if the module type is not one this function knows to be stateless.
    """
    if isinstance(mod, (nn.Identity, nn.Dropout)) or type(mod).__name__ == "DropPath":
        return x
    if isinstance(mod, nn.LayerNorm):
        return layer_norm(mod, x)
    if isinstance(mod, nn.RMSNorm) or type(mod).__name__ in ("RmsNorm", "RMSNorm"):
        return _rms_norm(mod, x)
    if isinstance(mod, nn.Linear):
        return linear(mod, x)
    if _is_layer_scale(mod):
        return _layer_scale(mod, x)
    if isinstance(mod, nn.Sequential):
        for child in mod:
            x = apply_module(child, x)
        return x
    if isinstance(mod, _STATELESS) or (
        not any(True for _ in mod.parameters(recurse=True)) and not any(True for _ in mod.children())
        and type(mod).__name__ in ("QuickGELU", "GELUTanh", "GELU", "SiLU", "QuickGELUApprox")
    ):
        return mod(x)
    raise TypeError(
        f"legrad does not know how to apply {type(mod).__module__}.{type(mod).__name__} statelessly; "
        "please open an issue with the model name."
    )


_HOOK_DICTS = (
    "_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
)


def eval_view(module: nn.Module) -> nn.Module:
    """A copy of a module tree in eval mode that shares the original's parameters and buffers.

    Used for convolutional stems (ViTamin's MbConv stages, MobileCLIP's ConvStem with BatchNorm), whose
    forward is pure in eval mode but would use batch statistics, dropout or drop-path in train mode.
    Nothing is copied but the module objects themselves (parameter/buffer dicts are shared, so weight
    updates and ``.to()`` are seen); the user's module, its mode and its hooks are untouched, and the
    view's hooks are empty.
    """
    view = copy.copy(module)
    d = view.__dict__
    d["_modules"] = OrderedDict((k, None if c is None else eval_view(c)) for k, c in module._modules.items())
    d["training"] = False
    for name in _HOOK_DICTS:
        if name in d:
            d[name] = OrderedDict()
    # transformers 5.x records hidden states with forward hooks it installs once per model and flags as
    # installed; the view has none of them, so the flag is dropped and transformers installs its own on the
    # view's (copied) modules, never on the user's.
    d.pop("_output_capturing_hooks_installed", None)
    return view
