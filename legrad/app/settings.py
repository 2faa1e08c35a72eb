"""The demo app's limits and the operator's settings (:class:`AppSettings`), light to import (no torch, no
gradio): ``legrad app --help`` reads its defaults from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["TOY_LABEL", "MAX_PROMPTS", "MAX_PROMPT_CHARS", "MAX_PROMPTS_TEXT", "MAX_SIZE_TEXT", "MAX_CACHED_MODELS",
           "DEFAULT_TIME_LIMIT_S", "DEFAULT_CONCURRENCY", "MAX_NEW_TOKENS", "DEFAULT_METHOD", "AppSettings", "parse_layer", "parse_alpha"]

TOY_LABEL = "toy: bundled demo model (offline)"
MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 200
MAX_PROMPTS_TEXT = 8000
MAX_SIZE_TEXT = 24
MAX_CACHED_MODELS = 2
#: Default per-request time limit in seconds (``--time-limit``).
DEFAULT_TIME_LIMIT_S = 60.0
#: Default number of explanations computed at once (``--concurrency``).
DEFAULT_CONCURRENCY = 2
#: The most tokens a local VLM generates when it explains its own answer (one map each; within --time-limit).
MAX_NEW_TOKENS = 16
#: The method the page's method choice starts on (a name of :data:`legrad.methods.METHODS`).
DEFAULT_METHOD = "legrad"


@dataclass
class AppSettings:
    """The server operator's choices, held by one :class:`~legrad.app.requests.DemoApp` (built from the
    flags by :func:`legrad.app.server.serve`; the library keeps no settings of its own).

    Attributes:
        device: torch device models load on.
        allowed_dirs: real paths of the folders visitors may read images from (``--allow-dir``).
        allow_urls: whether visitors may give public http(s) URLs (``--allow-urls``).
        allow_downloads: whether the model list also offers the OpenCLIP models whose weights are downloaded
            on a visitor's first request (``--allow-downloads``); off, it holds only the demo model and
            ``extra_labels``.
        max_tokens: patch-token limit per explained image; None for the Explainer's default.
        extra_labels: operator-added dropdown entries (``--model``), listed first after the demo model.
        upload_dirs: real paths of Gradio's upload/cache folders (recorded by the page when it is built);
            the image field reads files inside them only (and the example images).
        example_files: real paths of the bundled example images the page offers.
        time_limit: seconds one request may compute once its model is loaded (``--time-limit``); None
            for no limit.
    """

    device: str = "cpu"
    allowed_dirs: tuple[str, ...] = ()
    allow_urls: bool = False
    allow_downloads: bool = False
    max_tokens: int | None = None
    extra_labels: tuple[str, ...] = ()
    upload_dirs: tuple[str, ...] = ()
    example_files: frozenset[str] = frozenset()
    time_limit: float | None = DEFAULT_TIME_LIMIT_S


def parse_layer(layer_index: Any) -> int | None:
    """A visitor's layer index (a whole number, possibly given as a float by the page); None when blank.

    Raises:
        ValueError: for a fractional number.
    """
    if layer_index is None or layer_index == "":
        return None
    if float(layer_index) != int(float(layer_index)):
        raise ValueError(f"layer index must be a whole number, got {layer_index}")
    return int(float(layer_index))


def parse_alpha(alpha: Any) -> float:
    """A visitor's overlay opacity.

    Raises:
        ValueError: outside [0, 1] (or not a number).
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {alpha}")
    return alpha
