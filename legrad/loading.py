"""Model, image and option loading shared by ``playground.py``, the ``legrad`` command line and ``app.py``.

``load_model('toy')`` gives the bundled demo model (offline); ``timm:``, ``torchvision:`` and ``hf:``
names give ViT image classifiers (:mod:`legrad.classifier_loading`); any other name is an OpenCLIP
model whose weights come through ``open_clip`` as usual (download or local checkpoint). Every failure is a
:class:`ModelLoadError` / :class:`ImageLoadError` with a one-line message, so front ends can print it
instead of a traceback. Images are read by :func:`legrad.images.load_image` (re-exported here): bounded
work, regular files only, URLs on public addresses only, 16-bit/float/EXIF decoded correctly.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .images import MAX_IMAGE_PIXELS, ImageLoadError, ImageTooLargeError, load_image

__all__ = [
    "TOY_NAME",
    "ModelLoadError",
    "ImageLoadError",
    "ImageTooLargeError",
    "MAX_IMAGE_PIXELS",
    "load_model",
    "resolve_device",
    "default_layer_index",
    "default_pretrained",
    "native_image_size",
    "load_image",
    "parse_size",
    "model_choices",
    "configure_logging",
    "SampleScene",
    "sample_scenes",
    "absent_phrase",
]

logger = logging.getLogger(__name__)

#: Name of the bundled demo model in every front end.
TOY_NAME = "toy"

#: File suffixes treated as images when walking folders.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})

# Values of ``pretrained`` that mean "random initialisation" for OpenCLIP models.
_NO_WEIGHTS = {"none", "random", ""}


class ModelLoadError(RuntimeError):
    """A model could not be created or its weights could not be loaded; the message says why and what to do."""


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    if _is_toy(name):
        try:
            from legrad.toy import LAYER_INDEX
        except ImportError:
            return -2
        return int(LAYER_INDEX)
    return -2


def default_pretrained(name: str) -> str | None:
    """The first pretrained tag OpenCLIP lists for ``name`` (None for the demo model, classifiers (their
    library picks its default weights) or when there is none)."""
    from .classifier_loading import is_classifier_name

    if _is_toy(name) or is_classifier_name(name):
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
    from .pretrained import list_pretrained

    return [(TOY_NAME, None), *list_pretrained()]


def _is_toy(name: str | None) -> bool:
    return name is None or name.strip().lower() == TOY_NAME


def load_model(
    name: str = TOY_NAME, pretrained: str | None = None, device: str = "cpu"
) -> tuple[Any, Callable, Callable]:
    """Loads a model, its eval preprocess and its tokenizer.

    Args:
        name: ``'toy'`` for the bundled demo model, an image classifier ``timm:ARCH[.TAG]``,
            ``torchvision:NAME`` or ``hf:REPO_OR_DIR`` (see :mod:`legrad.classifier_loading`), or an
            OpenCLIP model name (``open_clip.list_models()``).
        pretrained: for classifiers, see :mod:`legrad.classifier_loading` (``'none'``: random weights);
            for OpenCLIP models, a pretrained tag (see ``legrad models``), a local checkpoint path,
            or ``'none'`` for random weights; None picks the model's first listed tag. For the demo model,
            None (the bundled checkpoint) or a path to another demo checkpoint.
        device: ``'cpu'``, ``'cuda'``, ``'cuda:1'`` or ``'auto'``.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode on ``device``, its image preprocess
        (PIL -> ``[3, H, W]`` tensor) and its tokenizer (list of str -> ``[N, L]`` LongTensor); for a
        classifier, the third item is its :class:`~legrad.classifier_loading.ClassLabels` (class
        indices or names -> ``[P]`` LongTensor of class indices).

    Raises:
        ModelLoadError: unknown or unsupported model, unknown tag, failed download or unreadable checkpoint.
        ValueError: for an unavailable device.
    """
    device = resolve_device(device)
    if _is_toy(name):
        return _load_toy(pretrained, device)
    from .classifier_loading import is_classifier_name, load_classifier

    if is_classifier_name(name):
        return load_classifier(name, pretrained, device)
    return _load_open_clip(name.strip(), pretrained, device)


def _load_toy(path: str | None, device: str) -> tuple[Any, Callable, Callable]:
    try:
        from legrad import toy
    except ImportError as exc:
        raise ModelLoadError(f"the bundled demo model is not available in this install ({_one_line(exc)})") from exc
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
        raise ModelLoadError(f"could not load the demo model checkpoint: {_one_line(exc)}") from exc


def _load_open_clip(name: str, pretrained: str | None, device: str) -> tuple[Any, Callable, Callable]:
    import open_clip

    from .pretrained import supports_model_config

    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower() == name.lower()]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ModelLoadError(
            f"unknown model {name!r}{hint}; run `legrad models` for the supported models, or use 'toy'"
        )
    if not supports_model_config(name):
        from .towers import supported_tower_names

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
            raise ModelLoadError(f"could not load checkpoint {tag!r} into {name}: {_one_line(exc)}") from exc
        raise ModelLoadError(
            f"could not download the {tag!r} weights of {name} ({_one_line(exc, 160)}); check the internet "
            "connection, or give a downloaded checkpoint file as pretrained (--pretrained PATH)"
        ) from exc
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as exc:
        raise ModelLoadError(f"could not load the tokenizer of {name}: {_one_line(exc, 160)}") from exc
    model.eval()
    return model, preprocess, tokenizer


def _weights_cached(pretrained_cfg: dict) -> bool:
    """Whether open_clip would find these weights in its local caches (Hugging Face Hub or URL cache)."""
    hub = pretrained_cfg.get("hf_hub", "")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return False
        repo_id, filename = os.path.split(hub)
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            candidates.insert(0, filename[: -len(".bin")] + ".safetensors")
        return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in candidates)
    url = pretrained_cfg.get("url", "")
    if url:
        return os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url)))
    return False


def _fail_fast_if_offline(name: str, tag: str) -> None:
    """Raises at once when weights must be downloaded but their host is unreachable.

    Without this, the Hub client retries with backoff for about a minute before giving up. The probe is
    skipped when a proxy or ``HF_HUB_OFFLINE`` is configured (the clients handle those themselves) and
    when the weights are already cached.
    """
    import open_clip

    env = {k.lower() for k, v in os.environ.items() if v}
    if env & {"https_proxy", "http_proxy", "all_proxy", "hf_hub_offline", "transformers_offline"}:
        return
    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if not cfg or "file" in cfg or _weights_cached(cfg):
        return
    check_download_reachable(None if cfg.get("hf_hub") else cfg.get("url"), f"{tag!r} weights of {name}",
                             "or use the offline demo model 'toy'")


def check_download_reachable(url: str | None, what: str, alternative: str = "or use --pretrained none for random "
                             "weights") -> None:
    """Raises :class:`ModelLoadError` at once when ``url``'s host (the Hugging Face Hub when None) is
    unreachable, instead of letting a download client retry for a minute. No-op when a proxy or an
    offline mode is configured (the clients handle those themselves).
    """
    import socket
    from urllib.parse import urlparse

    env = {k.lower() for k, v in os.environ.items() if v}
    if env & {"https_proxy", "http_proxy", "all_proxy", "hf_hub_offline", "transformers_offline"}:
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    host = urlparse(url or endpoint).hostname
    if not host:
        return
    try:
        socket.create_connection((host, 443), timeout=5.0).close()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot download the {what}: {host} is unreachable ({_one_line(exc, 80)}) and they are not in "
            "the local cache; connect to the internet once, or give a local checkpoint file as pretrained "
            f"(--pretrained PATH), {alternative}"
        ) from exc


def parse_size(value: Any) -> tuple[int, int] | None:
    """Parses an image size: ``None``/``''``/``0``/``'native'`` -> None, ``448`` or ``'448'`` -> (448, 448),
    ``'448x640'`` -> (448, 640) (height x width).

    Raises:
        ValueError: for anything else or non-positive sizes.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid image size {value!r}")
    if isinstance(value, (int, float)):
        if value != int(value):
            raise ValueError(f"image size must be a whole number of pixels, got {value!r}")
        value = str(int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        value = f"{value[0]}x{value[1]}"
    text = str(value).strip().lower()
    if text in ("", "0", "native", "none", "auto"):
        return None
    m = re.fullmatch(r"(\d{1,9})(?:\s*[x,*]\s*(\d{1,9}))?", text) if len(text) <= 32 else None
    if not m:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ValueError(f"invalid image size {shown}; use N (square) or HxW, e.g. 448 or 448x672")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {value!r}")
    return (h, w)


class _DropOpenClipChatter(logging.Filter):
    """Drops open_clip's own log lines (it logs download failures and random-init notices on the root
    logger), which front ends replace by their one-line messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/open_clip/" not in record.pathname.replace("\\", "/")


def configure_logging(verbose: bool = False) -> None:
    """Logging for the front ends (CLI, playground, app): warnings (info with ``verbose``) on stderr, and
    open_clip's root-logger messages hidden unless ``verbose``. Not for library use."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, _DropOpenClipChatter) for f in handler.filters):
                handler.addFilter(_DropOpenClipChatter())


@dataclass(frozen=True)
class SampleScene:
    """A demo scene image shipped in the repository's ``assets/`` folder.

    Attributes:
        path: the PNG file.
        phrases: the phrases naming its objects (what the demo model knows).
    """

    path: Path
    phrases: tuple[str, ...]


def sample_scenes(folder: str | os.PathLike) -> list[SampleScene]:
    """The scenes listed in ``folder/scenes.json`` whose image files exist (empty if there is no list).

    Raises:
        ValueError: if ``scenes.json`` exists but is malformed.
    """
    import json

    folder = Path(folder)
    index = folder / "scenes.json"
    if not index.is_file():
        return []
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))["scenes"]
        scenes = [SampleScene(folder / e["file"], tuple(str(p) for p in e["phrases"])) for e in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is malformed: {_one_line(exc)}") from exc
    return [s for s in scenes if s.path.is_file()]


def absent_phrase(phrases: Sequence[str]) -> str:
    """A demo-vocabulary phrase sharing neither colour nor shape with ``phrases`` (a contrast prompt)."""
    from legrad.toy.scenes import VOCABULARY

    words = {w for p in phrases for w in p.split()[1:]}
    for v in VOCABULARY:
        if not words & set(v.split()[1:]):
            return v
    return next(v for v in VOCABULARY if v not in phrases)
