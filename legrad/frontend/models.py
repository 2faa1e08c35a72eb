"""Loading a model by name for the front ends: the bundled demo model, OpenCLIP models and classifiers.

``load_model('toy')`` gives the bundled demo model (offline); ``timm:``, ``torchvision:`` and ``hf:``
names give ViT image classifiers (:mod:`legrad.frontend.classifier_models`); any other name is an
OpenCLIP model whose weights come through ``open_clip`` as usual (download or local checkpoint). Every
failure is a :class:`ModelLoadError` with a one-line message, so front ends can print it instead of a
traceback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..io.errors import ModelLoadError, one_line
from .downloads import check_download_reachable, offline_or_proxied, weights_cached

__all__ = [
    "TOY_NAME",
    "ModelLoadError",
    "load_model",
    "resolve_device",
    "default_layer_index",
    "model_layer_index",
    "default_pretrained",
    "native_image_size",
    "model_choices",
    "is_toy_name",
]

logger = logging.getLogger(__name__)

#: Name of the bundled demo model in every front end.
TOY_NAME = "toy"

# Values of ``pretrained`` that mean "random initialisation" for OpenCLIP models.
_NO_WEIGHTS = {"none", "random", ""}


def resolve_device(device: str | None = "auto") -> str:
    """``'auto'`` -> ``'cuda'`` when available else ``'cpu'``; other values are checked and returned.

    Raises:
        ValueError: for ``'cuda'`` without a usable GPU, or an unknown device string.
    """
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
        return dev
    if dev in ("cpu", "mps"):
        return dev
    raise ValueError(f"unknown device {device!r}; use auto, cpu or cuda")


def default_layer_index(name: str) -> int:
    """Recommended ``layer_index`` for a model name: the demo model's tuned value, else ``-2``."""
    if is_toy_name(name):
        try:
            from legrad.toy import LAYER_INDEX
        except ImportError:
            return -2
        return int(LAYER_INDEX)
    return -2


def model_layer_index(model: Any, name: str) -> int:
    """The loaded model's own recommended ``layer_index`` (the demo model's, for its depth), else
    :func:`default_layer_index` of its name."""
    hint = getattr(model, "legrad_layer_index", None)
    if isinstance(hint, int) and not isinstance(hint, bool):
        return hint
    return default_layer_index(name)


def default_pretrained(name: str) -> str | None:
    """The first pretrained tag OpenCLIP lists for ``name`` (None for the demo model, classifiers (their
    library picks its default weights) or when there is none)."""
    from .classifier_models import is_classifier_name

    if is_toy_name(name) or is_classifier_name(name):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    return tags[0] if tags else None


def native_image_size(model: Any) -> tuple[int, int]:
    """The ``(height, width)`` the model's image tower was built for."""
    visual = getattr(model, "visual", model)
    size = getattr(visual, "image_size", None)
    if size is None:  # timm models: their patch embedding's size; transformers: the config's
        size = getattr(getattr(visual, "patch_embed", None), "img_size", None)
    if size is None and getattr(getattr(model, "config", None), "image_size", None) is not None:
        size = model.config.image_size
    if size is None:
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        size = cfg.get("size", 224)
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def model_choices() -> list[tuple[str, str | None]]:
    """``(model, pretrained)`` pairs a user can pick: the demo model first, then ``legrad.list_pretrained()``."""
    from ..pretrained import list_pretrained

    return [(TOY_NAME, None), *list_pretrained()]


def is_toy_name(name: str | None) -> bool:
    """Whether ``name`` selects the bundled demo model (``'toy'``, any case, or None)."""
    return name is None or name.strip().lower() == TOY_NAME


def load_model(
    name: str = TOY_NAME, pretrained: str | None = None, device: str = "cpu"
) -> tuple[Any, Callable, Callable]:
    """Loads a model, its eval preprocess and its tokenizer.

    Args:
        name: ``'toy'`` for the bundled demo model, an image classifier ``timm:ARCH[.TAG]``,
            ``torchvision:NAME`` or ``hf:REPO_OR_DIR`` (see :mod:`legrad.frontend.classifier_models`), or an
            OpenCLIP model name (``open_clip.list_models()``).
        pretrained: for classifiers, see :mod:`legrad.frontend.classifier_models` (``'none'``: random weights);
            for OpenCLIP models, a pretrained tag (see ``legrad models``), a local checkpoint path,
            or ``'none'`` for random weights; None picks the model's first listed tag. For the demo model,
            None (the bundled checkpoint) or a path to another demo checkpoint.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'`` or ``'auto'``.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode on ``device``, its image preprocess
        (PIL -> ``[3, H, W]`` tensor) and its tokenizer (list of str -> ``[N, L]`` LongTensor); for a
        classifier, the third item is its :class:`~legrad.frontend.classifier_models.ClassLabels` (class
        indices or names -> ``[P]`` LongTensor of class indices).

    Raises:
        ModelLoadError: unknown or unsupported model, unknown tag, failed download or unreadable checkpoint.
        ValueError: for an unavailable device.
    """
    device = resolve_device(device)
    if is_toy_name(name):
        return _load_toy(pretrained, device)
    from .classifier_models import is_classifier_name, load_classifier

    if is_classifier_name(name):
        return load_classifier(name, pretrained, device)
    return _load_open_clip(name.strip(), pretrained, device)


def _load_toy(path: str | None, device: str) -> tuple[Any, Callable, Callable]:
    try:
        from legrad import toy
    except ImportError as exc:
        raise ModelLoadError(f"the bundled demo model is not available in this install ({one_line(exc)})") from exc
    if path is not None and str(path).strip().lower() not in _NO_WEIGHTS:
        if not os.path.isfile(path):
            raise ModelLoadError(f"demo model checkpoint {path!r} not found; omit --pretrained to use the bundled one")
        ckpt = path
    else:
        ckpt = None
        bundled = getattr(toy, "CHECKPOINT_PATH", None)
        if bundled is not None and not os.path.isfile(bundled):
            raise ModelLoadError(
                f"the bundled demo model checkpoint is missing ({bundled}); reinstall legrad_torch or use an "
                "OpenCLIP model with --model"
            )
    try:
        return toy.load_model(device=device, path=ckpt) if ckpt is not None else toy.load_model(device=device)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"could not load the demo model checkpoint: {one_line(exc)}") from exc


def _load_open_clip(name: str, pretrained: str | None, device: str) -> tuple[Any, Callable, Callable]:
    import open_clip

    from ..pretrained import supports_model_config

    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower() == name.lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}{hint}; run `legrad models` for the supported models, or use 'toy'"
        )
    if not supports_model_config(name):
        from .. import supported_tower_names

        raise ModelLoadError(
            f"model {name!r} has an image tower LeGrad does not support (supported: "
            f"{', '.join(supported_tower_names())}); run `legrad models` for the supported ones"
        )
    if pretrained is None:
        pretrained = default_pretrained(name)
        if pretrained is not None:
            logger.info("using pretrained=%r for %s", pretrained, name)
    tag = pretrained
    if tag is not None and tag.strip().lower() in _NO_WEIGHTS:
        tag = None
    if tag is None:
        logger.warning("%s has random weights (pretrained=%r): its heatmaps and scores are meaningless", name,
                       pretrained)
    is_file = tag is not None and os.path.isfile(tag)
    if tag is not None and not is_file:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if tag.lower() not in (t.lower() for t in tags):
            looks_like_path = os.sep in tag or tag.endswith((".pt", ".pth", ".bin", ".safetensors"))
            if looks_like_path:
                raise ModelLoadError(f"checkpoint file {tag!r} not found")
            listed = ", ".join(tags) if tags else "none"
            raise ModelLoadError(
                f"unknown pretrained tag {tag!r} for {name} (known: {listed}); or pass a local checkpoint path"
            )
    if tag is not None and not is_file:
        _fail_fast_if_offline(name, tag)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, device=device)
    except Exception as exc:
        if is_file:
            raise ModelLoadError(f"could not load checkpoint {tag!r} into {name}: {one_line(exc)}") from exc
        raise ModelLoadError(
            f"could not download the {tag!r} weights of {name} ({one_line(exc, 160)}); check the internet "
            "connection, or give a downloaded checkpoint file as pretrained (--pretrained PATH)"
        ) from exc
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer of {name}: {one_line(exc, 160)}") from exc
    model.eval()
    return model, preprocess, tokenizer


def _fail_fast_if_offline(name: str, tag: str) -> None:
    """Raises at once when weights must be downloaded but their host is unreachable (see
    :mod:`legrad.frontend.downloads`)."""
    import open_clip

    if offline_or_proxied():
        return
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if not cfg or "file" in cfg or weights_cached(cfg):
        return
    check_download_reachable(None if cfg.get("hf_hub") else cfg.get("url"), f"{tag!r} weights of {name}",
                             "or use the offline demo model 'toy'")
