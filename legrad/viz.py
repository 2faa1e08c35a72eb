"""Heatmap overlays and multi-panel figures.

Everything here is headless-safe: figures are built with matplotlib's object API (no pyplot state,
no display needed) unless the caller asks for a window with ``show=True``. In notebooks the figures
render themselves (see `NotebookFigure`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .io_utils import atomic_writer  # noqa: F401
from .notebook import NotebookFigure, notebook_shell
from .preprocess import OPENAI_MEAN, OPENAI_STD, normalization_of

__all__ = ["overlay", "visualize", "NotebookFigure", "to_rgb_array", "heatmap_to_array", "colorize",
           "fit_for_display", "atomic_writer", "DISPLAY_MAX_SIDE"]

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
    if isinstance(image, Image.Image):
        from .images import to_rgb  # 16-bit and float modes scaled by their range, alpha over white

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


def _split_images(image: Any) -> list[Any]:
    """A single image or a batch (list, or tensor ``[B, 3, H, W]``) -> list of single images."""
    if isinstance(image, (list, tuple)):
        return list(image)
    if hasattr(image, "ndim") and hasattr(image, "detach") and image.ndim == 4:
        return [image[i] for i in range(image.shape[0])]
    return [image]


def _maps_grid(heatmaps: Any, num_images: int) -> np.ndarray:
    """Heatmaps as ``[B, P, H, W]`` float32."""
    if isinstance(heatmaps, (list, tuple)):
        heatmaps = np.stack([heatmap_to_array(h) for h in heatmaps])
    if hasattr(heatmaps, "detach"):
        heatmaps = heatmaps.detach().to("cpu").float().numpy()
    arr = np.asarray(heatmaps, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"heatmaps must be [H, W], [P, H, W] or [B, P, H, W], got shape {arr.shape}")
    if arr.shape[0] != num_images:
        raise ValueError(
            f"heatmaps hold {arr.shape[0]} images but {num_images} image(s) were given; pass the batch that "
            "produced them"
        )
    if arr.shape[1] == 0:
        raise ValueError("heatmaps hold zero prompts")
    return arr


def _show_mode(show: bool | None, save_path: Any) -> str:
    """Where to show the figure: ``"notebook"``, ``"window"`` or ``"none"``."""
    if show is not None and not isinstance(show, bool):
        raise TypeError(f"show must be True, False or None, got {type(show).__name__}")
    in_notebook = notebook_shell() is not None
    if show:
        return "notebook" if in_notebook else "window"
    if show is False or save_path is not None or in_notebook:
        # In a notebook the returned figure renders itself when it is the cell's last expression.
        return "none"
    # Auto: only an interactive interpreter with a GUI backend gets a (non-blocking) window, so
    # scripts, tests and servers never block.
    import matplotlib

    interactive = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    backend = matplotlib.get_backend().lower()
    gui = backend not in {"agg", "pdf", "ps", "svg", "cairo", "template"} and "inline" not in backend
    return "window" if interactive and gui else "none"


def visualize(
    image: Any,
    heatmaps: Any,
    alpha: float = 0.6,
    text_prompts: Sequence[str] | None = None,
    save_path: str | os.PathLike | None = None,
    show: bool | None = None,
    *,
    colormap: str = "jet",
    normalization: Any = None,
    panel_size: float = 2.6,
    dpi: int = 120,
) -> Any:
    """A figure with the original image followed by one overlay panel per prompt (one row per image).

    Args:
        image: one image (PIL, ``[H, W, 3]`` uint8 array, normalised ``[3, H, W]``/``[1, 3, H, W]``
            tensor) or a batch (list of those, or a ``[B, 3, H, W]`` tensor).
        heatmaps: ``[H, W]``, ``[P, H, W]`` or ``[B, P, H, W]`` maps in [0, 1], e.g. ``compute_legrad``'s output.
        alpha: heatmap opacity in [0, 1].
        text_prompts: ``P`` panel titles (the prompts); "prompt 1", ... when None.
        save_path: write the figure there as PNG (parent folders are created).
        show: ``True``: in a notebook, display the figure inline now; elsewhere open a pyplot window
            (blocking like ``plt.show()``). ``False``: display nothing. ``None`` (default): a window
            only in an interactive interpreter with a GUI backend and no ``save_path``; nothing in
            scripts, tests and servers (they never block) and nothing in notebooks, where the
            returned figure renders itself as a cell's last expression.
        colormap: matplotlib colormap name.
        normalization: for tensor images, how they were normalised: OpenAI's CLIP mean/std when None
            (most OpenCLIP models, and the bundled demo model); pass the preprocess, the model or a
            ``(mean, std)`` pair for models trained with other statistics (e.g. SigLIP's 0.5/0.5),
            otherwise the colours are off.
        panel_size: panel side in inches.
        dpi: resolution of the saved PNG and of the notebook image.

    Returns:
        A :class:`NotebookFigure` (a ``matplotlib.figure.Figure``). In Jupyter, JupyterLab and VS Code
        notebooks it shows exactly once, with or without ``%matplotlib inline``: as the cell's last
        expression, or at the call with ``show=True`` (then not again in that cell).

    Raises:
        TypeError, ValueError: on invalid inputs, before drawing.
    """
    mode = _show_mode(show, save_path)
    images = _split_images(image)
    if not images:
        raise ValueError("image batch is empty")
    maps = _maps_grid(heatmaps, len(images))
    num_prompts = maps.shape[1]
    if text_prompts is None:
        titles = [f"prompt {i + 1}" for i in range(num_prompts)]
    else:
        if isinstance(text_prompts, str):
            text_prompts = [text_prompts]
        titles = [str(t) for t in text_prompts]
        if len(titles) != num_prompts:
            raise ValueError(f"got {len(titles)} text_prompts for {num_prompts} heatmaps per image")
    panels = []
    for img, row in zip(images, maps):
        rgb = fit_for_display(img, DISPLAY_MAX_SIDE, normalization)
        panels.append((rgb, [overlay(rgb, m, alpha=alpha, colormap=colormap) for m in row]))

    figsize = (panel_size * (num_prompts + 1), (panel_size + 0.35) * len(images))
    if mode == "window":
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize, FigureClass=NotebookFigure, display_dpi=dpi)
    else:
        # No pyplot: the figure stays out of pyplot's global state (threads, servers, notebooks).
        fig = NotebookFigure(figsize=figsize, display_dpi=dpi)
    axes = fig.subplots(len(images), num_prompts + 1, squeeze=False)
    for r, (rgb, overlays) in enumerate(panels):
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_title("image", fontsize=10)
        for c, (ov, title) in enumerate(zip(overlays, titles), start=1):
            axes[r, c].imshow(ov)
            axes[r, c].set_title(_wrap(title), fontsize=10)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()

    if save_path is not None:
        _atomic_savefig(fig, Path(save_path), dpi)
    if mode == "notebook":
        fig.show_in_notebook(notebook_shell())
    elif mode == "window":
        import matplotlib.pyplot as plt

        plt.show(block=bool(show))
    return fig


def _wrap(title: str, width: int = 28) -> str:
    import textwrap

    lines = [wrapped for line in title.splitlines() for wrapped in (textwrap.wrap(line, width) or [""])]
    return "\n".join(lines[:4])


def _atomic_savefig(fig: Any, path: Path, dpi: int) -> None:
    with atomic_writer(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
