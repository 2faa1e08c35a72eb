"""Multi-panel figures: each image followed by one heatmap overlay per prompt.

Everything here is headless-safe: figures are built with matplotlib's object API (no pyplot state,
no display needed) unless the caller asks for a window with ``show=True``. In notebooks the figures
render themselves (see :class:`~legrad.viz.display.NotebookFigure`).
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from ..io.files import atomic_writer
from .display import NotebookFigure, notebook_shell
from .overlays import DISPLAY_MAX_SIDE, fit_for_display, heatmap_to_array, overlay

__all__ = ["answer_figure", "visualize"]


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
    colorbar: bool = False,
) -> Any:
    """A figure with the original image followed by one overlay panel per prompt (one row per image).

    Args:
        image: one image (PIL, ``[H, W, 3]`` uint8 array, normalised ``[3, H, W]``/``[1, 3, H, W]``
            tensor) or a batch (list of those, or a ``[B, 3, H, W]`` tensor).
        heatmaps: ``[H, W]``, ``[P, H, W]`` or ``[B, P, H, W]`` maps in [0, 1], e.g. ``compute_legrad``'s output.
        alpha: heatmap opacity in [0, 1].
        text_prompts: the panel titles (the prompts): ``P`` strings shared by every image, or, for a
            batch explained with per-image prompts (``[B, P, D]`` text), ``B`` sequences of ``P``
            strings, one per image row; "prompt 1", ... when None.
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
        colorbar: add a colour bar for the heatmaps' scale (0: least relevant, 1: most relevant; each
            map is min-max normalised on its own, so the bar reads per map, not across maps).

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
    if not isinstance(colorbar, bool):
        raise TypeError(f"colorbar must be True or False, got {type(colorbar).__name__}")
    row_titles = _row_titles(text_prompts, len(images), num_prompts)
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
    for r, ((rgb, overlays), titles) in enumerate(zip(panels, row_titles)):
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_title("image" if len(panels) == 1 else f"image {r + 1}", fontsize=10)
        for c, (ov, title) in enumerate(zip(overlays, titles), start=1):
            axes[r, c].imshow(ov)
            axes[r, c].set_title(_wrap(title), fontsize=10)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    if colorbar:
        _add_colorbar(fig, axes, colormap)

    if save_path is not None:
        _atomic_savefig(fig, Path(save_path), dpi)
    if mode == "notebook":
        fig.show_in_notebook(notebook_shell())
    elif mode == "window":
        import matplotlib.pyplot as plt

        plt.show(block=bool(show))
    return fig


def answer_figure(image: Any, answer_map: Any, answer_title: str, token_maps: Any, token_titles: Sequence[str],
                  save_path: str | os.PathLike | None = None, *, alpha: float = 0.6, colormap: str = "jet",
                  columns: int = 6, panel_size: float = 2.4, dpi: int = 120) -> Any:
    """A model's own answer: the image, the whole answer's overlay, then one overlay per answer token, in rows of
    ``columns`` panels (headless; the figure is returned and, with ``save_path``, written as PNG).

    Args:
        image: one image (as for :func:`visualize`).
        answer_map: ``[H, W]`` map of the whole answer in [0, 1].
        answer_title: its panel title (the answer and its log-probability).
        token_maps: ``[T, H, W]`` maps in [0, 1], one per token.
        token_titles: T panel titles (the token and its log-probability).
        save_path: where to write the PNG (None: not written).
        alpha, colormap: overlay opacity and colormap.
        columns: panels per row.

    Raises:
        ValueError: if the titles do not match the maps.
    """
    tokens = _maps_grid(token_maps, 1)[0]
    whole = _maps_grid(answer_map, 1)[0, 0]
    if len(token_titles) != len(tokens):
        raise ValueError(f"got {len(token_titles)} token titles for {len(tokens)} token maps")
    rgb = fit_for_display(image, DISPLAY_MAX_SIDE)
    panels = [(rgb, "image"), (overlay(rgb, whole, alpha=alpha, colormap=colormap), answer_title)]
    panels += [(overlay(rgb, m, alpha=alpha, colormap=colormap), t) for m, t in zip(tokens, token_titles)]
    columns = max(1, min(int(columns), len(panels)))
    rows = -(-len(panels) // columns)
    fig = NotebookFigure(figsize=(panel_size * columns, (panel_size + 0.45) * rows), display_dpi=dpi)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (picture, title) in zip(axes, panels):
        ax.imshow(picture)
        ax.set_title(_wrap(title, 24), fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    if save_path is not None:
        _atomic_savefig(fig, Path(save_path), dpi)
    return fig


def _row_titles(text_prompts: Any, num_images: int, num_prompts: int) -> list[list[str]]:
    """Panel titles per image row: ``[B][P]`` from shared (``P``) or per-image (``B x P``) prompts."""
    if text_prompts is None:
        return [[f"prompt {i + 1}" for i in range(num_prompts)]] * num_images
    if isinstance(text_prompts, str):
        text_prompts = [text_prompts]
    items = list(text_prompts)
    nested = [isinstance(t, Sequence) and not isinstance(t, str) for t in items]
    if any(nested):
        if not all(nested) or len(items) != num_images:
            raise ValueError(
                f"text_prompts must be {num_prompts} strings (shared by every image) or {num_images} lists of "
                f"{num_prompts} strings (one per image)"
            )
        rows = [[str(t) for t in row] for row in items]
        bad = [len(row) for row in rows if len(row) != num_prompts]
        if bad:
            raise ValueError(f"got a row of {bad[0]} text_prompts for {num_prompts} heatmaps per image")
        return rows
    titles = [str(t) for t in items]
    if len(titles) != num_prompts:
        raise ValueError(f"got {len(titles)} text_prompts for {num_prompts} heatmaps per image")
    return [titles] * num_images


def _add_colorbar(fig: Any, axes: np.ndarray, colormap: str) -> None:
    """One colour bar beside the heatmap panels, for the maps' [0, 1] scale."""

    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=colormaps[colormap])
    bar = fig.colorbar(mappable, ax=list(axes.ravel()), fraction=0.025, pad=0.01, shrink=0.9)
    bar.set_label("relevance (each map min-max normalised)", fontsize=9)


def _wrap(title: str, width: int = 28) -> str:

    lines = [wrapped for line in title.splitlines() for wrapped in (textwrap.wrap(line, width) or [""])]
    return "\n".join(lines[:4])


def _atomic_savefig(fig: Any, path: Path, dpi: int) -> None:
    with atomic_writer(path) as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")
