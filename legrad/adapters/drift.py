"""The drift guard: on every wrap, the adapter's stateless re-run is compared with the model's own forward.

legrad recomputes the image tower from its modules' weights. If an upstream release (open_clip, timm,
transformers, torchvision) changes what a block computes, or a block's ``forward`` is replaced, the
re-run would silently keep the old maths. :func:`check_drift` runs both on one fixed-seed noise input
of the tower's native size (batch 1) and raises :class:`DriftError` when they differ beyond a
tolerance set by the dtype.

Both run on an eval-mode *view* of the model (:func:`legrad.ops.functional.eval_view`: the
module objects are copied, parameters and buffers are shared, hooks are left out), never on the model
itself: a model in training mode would otherwise apply dropout (a random output that cannot be
compared) and update BatchNorm statistics (a write to the model), calling ``.eval()`` on it would
change its mode, and the user's hooks would fire. Eval semantics is also what legrad computes.
Nothing is cached: every wrap checks again.
"""

from __future__ import annotations

import importlib.metadata
import logging

import torch
from torch import nn

from ..ops.functional import eval_view
from .base import TowerAdapter
from .runner import rerun

__all__ = ["DriftError", "check_drift", "tolerance", "library_versions"]

logger = logging.getLogger(__name__)

# Libraries whose classes may make up a model; their versions are named in the error.
_LIBRARIES = {"open_clip": "open_clip_torch", "timm": "timm", "transformers": "transformers",
              "torchvision": "torchvision"}
_RELATIVE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class DriftError(ValueError, RuntimeError):
    """The adapter's re-run of the tower does not match the model's own forward (its message is one line).

    A ValueError, as for every other model legrad refuses (the model, as installed, is not one legrad can
    explain faithfully), so front ends that report bad input on one line report it too; and a RuntimeError,
    since what fails is the agreement between the installed model library and legrad's re-implementation.
    """


def tolerance(dtype: torch.dtype, device: torch.device) -> float:
    """Largest accepted difference, relative to the output's largest magnitude, for a model in ``dtype``.

    float32 on CUDA with TF32 matmuls allowed gets the float16 tolerance (TF32 keeps 10 mantissa bits).
    """
    if dtype == torch.float32 and device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        dtype = torch.float16
    return _RELATIVE_TOLERANCE.get(dtype, 1e-2)


def library_versions(model: nn.Module) -> str:
    """``"torch 2.x, open_clip 3.y, ..."``: torch and the installed libraries the model's classes come from."""
    used = {type(m).__module__.split(".", 1)[0] for m in model.modules()}
    parts = [f"torch {torch.__version__}"]
    for lib, dist in _LIBRARIES.items():
        if lib in used:
            try:
                parts.append(f"{lib} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                parts.append(f"{lib} (version unknown)")
    return ", ".join(parts)


def check_drift(adapter: TowerAdapter, model: nn.Module) -> None:
    """Compares legrad's re-run (:func:`~legrad.adapters.runner.rerun`) with ``adapter.own_output`` on a
    fixed-seed noise input (batch 1).

    Costs about two forwards of the image tower; builds no autograd graph beyond a transient one for an
    explained pooler, writes nothing and fires none of the model's hooks (both runs use an eval-mode view
    of the model, :func:`~legrad.ops.functional.eval_view`, that shares its weights). Families
    without ``own_output`` (user adapters) and models whose weights are on the meta device are not
    checked (logged).

    Args:
        adapter: the model's tower adapter.
        model: the model it was built from.

    Raises:
        DriftError: when the outputs differ beyond :func:`tolerance`, or one of the two runs fails;
            the one-line message names the family, the library versions, the largest difference and
            ``LeWrapper(model, verify=False)``.
    """
    if type(adapter).own_output is TowerAdapter.own_output:
        logger.info("%s: no own_output, so legrad cannot check its re-run against the model", adapter.family)
        return
    device, dtype = adapter.device(), adapter.param_dtype()
    if device.type == "meta":
        logger.info("%s: weights on the meta device, nothing to check the re-run against", adapter.family)
        return
    try:
        with torch.no_grad():
            # Both runs use the view, so that the check fires none of the user's hooks (HF adapters call the
            # embedding module as is); the view's adapter is the same family on the same weights.
            view = eval_view(model)
            checked = type(adapter).from_model(view) or adapter
            image = checked.probe_input()
            own = checked.own_output(view, image)
            ours = rerun(checked, image)
    except Exception as exc:
        problem = f"could not be compared ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        raise DriftError(_message(adapter, model, problem)) from exc
    problem = _difference(own, ours, tolerance(dtype, device), dtype)
    if problem:
        raise DriftError(_message(adapter, model, problem))


def _difference(own: torch.Tensor, rerun: torch.Tensor, tol: float, dtype: torch.dtype) -> str | None:
    """What differs between the two outputs (None when they agree within ``tol`` of the output scale)."""
    if own.shape != rerun.shape:
        return f"has shape {tuple(rerun.shape)} where the model's own forward gives {tuple(own.shape)}"
    own, rerun = own.detach().double(), rerun.detach().double()
    if not torch.equal(own.isfinite(), rerun.isfinite()):
        return "is non-finite where the model's own forward is not (or the other way round)"
    finite = own.isfinite()
    if not bool(finite.any()):
        return None
    scale = float(own[finite].abs().max())
    diff = float((own - rerun)[finite].abs().max())
    if diff <= tol * max(scale, 1e-12):
        return None
    return (f"differs from the model's own forward by up to {diff:.3g} (output scale {scale:.3g}, tolerance "
            f"{tol:g} relative for {str(dtype).replace('torch.', '')})")


def _message(adapter: TowerAdapter, model: nn.Module, problem: str) -> str:
    return (f"legrad's re-run of this {adapter.family} model {problem}; installed: {library_versions(model)}. "
            "The installed library (or a replaced forward) computes the tower differently from what legrad "
            "re-implements, so its maps would be wrong: please report it. LeWrapper(model, verify=False) skips "
            "this check at your own risk.")
