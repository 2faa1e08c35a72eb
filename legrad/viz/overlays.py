"""Colour maps and heatmap overlays, drawn at a bounded display size.

Images become ``[H, W, 3]`` uint8 arrays (:func:`to_rgb_array`), larger ones are downscaled for display
only (:func:`fit_for_display`, cv2's area averaging), and heatmaps are coloured through a matplotlib
colormap's lookup table (:func:`colorize`) and blended over them (:func:`overlay`) in row blocks, so
the memory of an overlay stays bounded whatever the image's size. matplotlib and cv2 are imported when
first needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..io.images import to_rgb
from ..preprocess import OPENAI_MEAN, OPENAI_STD, normalization_of

__all__ = ["overlay", "to_rgb_array", "heatmap_to_array", "colorize", "fit_for_display",
           "DISPLAY_MAX_SIDE"]

#: Longest side of drawn overlays and figure panels; larger images are downscaled for display only
#: (heatmaps themselves are never resampled by this limit).
DISPLAY_MAX_SIDE = 2048

# Tolerance on the [0, 1] range of heatmaps (float32 round-off of a min-max normalisation).
_RANGE_EPS = 1e-4


def _mean_std_of(normalization: Any) -> tuple[np.ndarray, np.ndarray]:
    """Resolves ``normalization`` (None, a preprocess, a model or a (mean, std) pair) to arrays."""
    if normalization is None:
        mean, std = OPENAI_MEAN, OPENAI_STD
    elif isinstance(normalization, (tuple, list)) and len(normalization) == 2 and all(
        isinstance(v, (tuple, list, np.ndarray)) for v in normalization
    ):
        mean, std = normalization
    elif hasattr(normalization, "visual") or hasattr(normalization, "preprocess_cfg"):
        # An OpenCLIP model (or LeWrapper): open_clip records the training mean/std on the image tower.
        visual = getattr(normalization, "visual", normalization)
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean, std = cfg.get("mean", OPENAI_MEAN), cfg.get("std", OPENAI_STD)
    elif hasattr(normalization, "transforms") or hasattr(normalization, "mean"):
        mean, std = normalization_of(normalization)
    else:
        raise TypeError(
            "normalization must be None, the model's preprocess, the model, or a (mean, std) pair; got "
            f"{type(normalization).__name__}"
        )
    mean_a = np.asarray(mean, dtype=np.float64).reshape(-1)
    std_a = np.asarray(std, dtype=np.float64).reshape(-1)
    if mean_a.size not in (1, 3) or std_a.size not in (1, 3) or np.any(std_a <= 0):
        raise ValueError(f"normalization needs 1 or 3 means and positive stds, got mean={mean}, std={std}")
    return mean_a, std_a


def to_rgb_array(image: Any, normalization: Any = None) -> np.ndarray:
    """Converts an image to an ``[H, W, 3]`` uint8 RGB array.

    Args:
        image: a PIL image; an ``[H, W, 3]`` (or ``[H, W]``) uint8 array, or float array in [0, 1]; or a
            normalised tensor ``[3, H, W]`` / ``[1, 3, H, W]`` as the model's preprocess returns it.
        normalization: for tensors, how to undo the normalisation: the preprocess, the model, or a
            ``(mean, std)`` pair (OpenAI's CLIP mean/std when None).

    Returns:
        ``[H, W, 3]`` uint8 array.

    Raises:
        TypeError, ValueError: for unsupported types or shapes, or a zero-sized image.
    """
    rgb = _to_rgb_array(image, normalization)
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image has zero height or width ({rgb.shape[0]}x{rgb.shape[1]})")
    return rgb


def _to_rgb_array(image: Any, normalization: Any = None) -> np.ndarray:
    if isinstance(image, Image.Image):  # 16-bit and float modes scaled by their range, alpha over white
        return np.asarray(to_rgb(image), dtype=np.uint8).copy()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        torch = None
    if torch is not None and isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float64)
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            hint = " (visualize one image at a time: image[i])" if t.ndim == 4 else ""
            raise ValueError(f"image tensor must be [3, H, W] or [1, 3, H, W], got {tuple(image.shape)}{hint}")
        mean, std = _mean_std_of(normalization)
        arr = t.numpy() * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)
        if arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        arr = arr.transpose(1, 2, 0)
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"image array must be [H, W, 3] (RGB), got shape {arr.shape}")
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            return arr.copy()
        if np.issubdtype(arr.dtype, np.floating):
            if arr.size and (np.nanmin(arr) < -_RANGE_EPS or np.nanmax(arr) > 1 + _RANGE_EPS):
                raise ValueError(
                    "float image arrays must hold values in [0, 1]; pass uint8 for 0-255 images or the "
                    "normalised tensor (with its normalization) for preprocessed images"
                )
            return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        raise TypeError(f"image array must be uint8 or float in [0, 1], got dtype {arr.dtype}")
    raise TypeError(
        "image must be a PIL image, an [H, W, 3] uint8 array or a normalised [3, H, W] tensor, got "
        f"{type(image).__name__}"
    )


def heatmap_to_array(heatmap: Any) -> np.ndarray:
    """Converts one heatmap (tensor or array, ``[H, W]`` with optional leading 1-dims) to float32 ``[H, W]``.

    Raises:
        ValueError: if the map is not 2-D after squeezing leading singleton dims, holds non-finite
            values, or lies outside [0, 1].
    """
    if hasattr(heatmap, "detach"):
        heatmap = heatmap.detach().to("cpu").float().numpy()
    arr = np.asarray(heatmap, dtype=np.float32)
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(
            f"heatmap must be [H, W] (one image, one prompt), got shape {arr.shape}; index it, e.g. maps[0, p]"
        )
    if arr.size == 0:
        raise ValueError(f"heatmap has zero height or width {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("heatmap contains NaN or infinite values")
    if arr.size and (arr.min() < -_RANGE_EPS or arr.max() > 1 + _RANGE_EPS):
        raise ValueError(
            f"heatmap values must lie in [0, 1] (got [{arr.min():.3g}, {arr.max():.3g}]); compute_legrad "
            "returns such maps, min-max normalise anything else first"
        )
    return np.clip(arr, 0.0, 1.0)


def _resize_map(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (area-averaging where it shrinks), clipped to [0, 1]."""
    if heat.shape == (height, width):
        return heat
    import cv2

    shrink = height < heat.shape[0] or width < heat.shape[1]
    resized = cv2.resize(np.ascontiguousarray(heat, dtype=np.float32), (width, height),
                         interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def fit_for_display(image: Any, max_side: int | None = DISPLAY_MAX_SIDE, normalization: Any = None) -> np.ndarray:
    """An image as ``[h, w, 3]`` uint8, downscaled (area averaging) so that its longer side is at most
    ``max_side``; unchanged when it already fits or ``max_side`` is None.

    Large PIL images are first reduced by an integer factor in Pillow, so a 12000 px original never
    becomes a full-size array here.

    Args:
        image: anything :func:`to_rgb_array` accepts.
        max_side: longest output side in pixels, or None.
        normalization: see :func:`to_rgb_array`.

    Raises:
        TypeError, ValueError: as :func:`to_rgb_array`, or for a non-positive ``max_side``.
    """
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise ValueError(f"max_side must be a positive int or None, got {max_side!r}")
    if isinstance(image, Image.Image) and max_side is not None and max(image.size) >= 2 * max_side:
        factor = max(image.size) // max_side
        try:
            image = image.reduce(factor)
        except ValueError:  # modes Pillow cannot average ("1", "P", "I;16"): pick pixels instead
            image = image.resize((max(1, image.width // factor), max(1, image.height // factor)),
                                 Image.Resampling.NEAREST)
    rgb = to_rgb_array(image, normalization)
    h, w = rgb.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return rgb
    import cv2

    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def colorize(heat: np.ndarray, colormap: str = "jet") -> np.ndarray:
    """Maps an ``[H, W]`` array in [0, 1] to ``[H, W, 3]`` float RGB in [0, 255] through a matplotlib colormap.

    The colormap's lookup table is indexed the way matplotlib indexes it, so the colours are those of
    ``matplotlib.colormaps[colormap](heat)`` without its per-pixel RGBA float64 intermediate.

    Raises:
        ValueError: if ``colormap`` is not a matplotlib colormap name.
    """
    lut = _colormap_lut(colormap)
    n = lut.shape[0]
    idx = (np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0) * np.float32(n)).astype(np.intp)
    np.minimum(idx, n - 1, out=idx)
    return lut[idx]


def _colormap_lut(colormap: str) -> np.ndarray:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise ValueError(
            f"unknown colormap {colormap!r}; use a matplotlib name such as 'jet', 'viridis' or 'inferno'"
        ) from None
    return cmap(np.arange(cmap.N))[:, :3].astype(np.float64) * 255.0


def overlay(
    image: Any,
    heatmap: Any,
    alpha: float = 0.6,
    colormap: str = "jet",
    *,
    normalization: Any = None,
    max_side: int | None = DISPLAY_MAX_SIDE,
) -> Image.Image:
    """Blends a heatmap, coloured by ``colormap``, over an image.

    Each output pixel is ``(1 - alpha) * image + alpha * colormap(heatmap)``. Images whose longer side
    exceeds ``max_side`` are downscaled first (display only: the heatmap given is not changed), so the
    work and memory of an overlay are bounded whatever the original's size.

    Args:
        image: PIL image, ``[H, W, 3]`` uint8 array, or normalised tensor ``[3, H, W]`` / ``[1, 3, H, W]``.
        heatmap: ``[H', W']`` map in [0, 1] (tensor or array); resized bilinearly to the image if the
            sizes differ.
        alpha: opacity of the heatmap, in [0, 1].
        colormap: matplotlib colormap name.
        normalization: for tensor images, the preprocess, model or ``(mean, std)`` used to normalise
            them (OpenAI's CLIP mean/std when None).
        max_side: longest side of the result (``DISPLAY_MAX_SIDE``); None draws at the full size.

    Returns:
        RGB PIL image of the image's size, or scaled down to fit ``max_side``.

    Raises:
        TypeError, ValueError: on invalid inputs.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    heat = heatmap_to_array(heatmap)
    lut = _colormap_lut(colormap)
    rgb = fit_for_display(image, max_side, normalization)
    heat = _resize_map(heat, rgb.shape[0], rgb.shape[1])
    out = np.empty_like(rgb)
    a = float(alpha)
    # Row blocks keep the float64 temporaries small whatever the image size.
    step = max(1, (1 << 20) // max(1, rgb.shape[1]))
    for r in range(0, rgb.shape[0], step):
        idx = (heat[r:r + step] * np.float32(lut.shape[0])).astype(np.intp)
        np.minimum(idx, lut.shape[0] - 1, out=idx)
        blended = (1.0 - a) * rgb[r:r + step].astype(np.float64) + a * lut[idx]
        out[r:r + step] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return Image.fromarray(out)
