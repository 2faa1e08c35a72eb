"""Where the app may read a visitor's image from: uploads, the bundled examples, and the operator's opt-ins.

A visitor's image reaches the server in one of three ways, each checked here on the *resolved real
path* (symbolic links and ``..`` resolved) before anything is opened:

* the image field: only files inside Gradio's own upload/cache folders or the bundled example images.
  Gradio checks the file values of its API only when they carry a ``meta`` marker, so a request can
  name any server path or URL in that field; every such value (dict, string, ``FileData``, list, URL...)
  gets the one fixed :data:`UPLOAD_ONLY_MSG`, which says nothing about the path (exists or not, file or
  not), and nothing is opened or fetched;
* a path in the "URL / path" box: only inside an ``--allow-dir`` folder (:data:`NO_PATH_MSG` otherwise);
* a URL in that box: only with ``--allow-urls``, only public addresses (``allow_private_urls=False`` is
  passed explicitly, so ``LEGRAD_ALLOW_PRIVATE_URLS`` in the server's environment does not apply).

Every image is refused from its header if it is far from square (:data:`MAX_ASPECT_RATIO`, stricter than
the library's default): the model's preprocess scales the short side up first, so a 300000x1 image would
become a 67-megapixel tensor. JPEGs of more than ``legrad.io.images.MAX_JPEG_SCANS`` scans are refused
before decoding, and the request's time limit (``--time-limit``) is checked before every chunk of a file
the decoder reads (a decoder cannot be stopped within a chunk).
Nothing here imports gradio; the operator's settings are passed in (a :class:`~legrad.app.settings.AppSettings`).
"""

from __future__ import annotations

import os
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ..engine.deadline import check_deadline
from ..io.errors import ImageLoadError, ImageTooLargeError
from ..io.fetch import URLRefusedError, is_url
from ..io.images import load_image

__all__ = ["UPLOAD_ONLY_MSG", "NO_SOURCE_MSG", "NO_PATH_MSG", "NO_URL_MSG", "URL_FAILED_MSG", "MAX_IMAGE_PIXELS",
           "MAX_URL_BYTES", "URL_DEADLINE_S", "MAX_ASPECT_RATIO", "SourcePolicy", "allowed_path", "checked_upload",
           "read_visitor_image", "shared_folder"]

#: Largest image decoded for a visitor (pixels), from uploads, shared folders and URLs alike.
MAX_IMAGE_PIXELS = 40_000_000
#: Largest URL download for a visitor (bytes), when ``--allow-urls`` is on.
MAX_URL_BYTES = 20 * 1024 * 1024
#: Total time for a URL download for a visitor (seconds).
URL_DEADLINE_S = 15.0
#: Largest ratio of an image's long side to its short side that the app explains (checked from the header,
#: before decoding, by :func:`legrad.io.images.load_image`; the library's default is 50).
MAX_ASPECT_RATIO = 20

UPLOAD_ONLY_MSG = "the image field takes only images uploaded to this page (or its examples); upload the image"
NO_SOURCE_MSG = ("this server reads no paths or URLs: upload the image instead (the server's operator can "
                 "enable them with --allow-dir / --allow-urls)")
NO_PATH_MSG = "that path is not available: this server only reads images inside the folders it shares"
NO_URL_MSG = "this server does not fetch URLs: upload the image instead (the operator can enable --allow-urls)"
URL_FAILED_MSG = ("could not load an image from that URL (unreachable, timed out, HTTP error or not an image); "
                  "try uploading it instead")
# Longest path or URL text looked at.
_MAX_TEXT = 2048


class SourcePolicy(Protocol):
    """What the operator lets visitors read (:class:`legrad.app.settings.AppSettings` has these)."""

    upload_dirs: tuple[str, ...]
    example_files: frozenset[str]
    allowed_dirs: tuple[str, ...]
    allow_urls: bool


def _inside(real: str, root: str) -> bool:
    return os.path.commonpath([real, root]) == root


def checked_upload(value: Any, policy: SourcePolicy) -> str:
    """The real path of an image-field value if it is an uploaded file or a bundled example.

    Args:
        value: what the API carried: a path string, a ``{"path": ...}`` dict, an object with a ``path``
            attribute (Gradio's ``FileData``), or anything else (refused).
        policy: the operator's settings (``upload_dirs``: real paths of Gradio's upload/cache folders;
            ``example_files``: real paths of the example images).

    Returns:
        The resolved real path, inside an upload folder or equal to an example image.

    Raises:
        ValueError: :data:`UPLOAD_ONLY_MSG` for every refused value (nothing about it is revealed or opened).
    """
    path = value.get("path") if isinstance(value, dict) else getattr(value, "path", value)
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str) or not path or len(path) > _MAX_TEXT or "\0" in path or is_url(path) \
            or "://" in path:
        raise ValueError(UPLOAD_ONLY_MSG)
    real = os.path.realpath(path)
    if real in policy.example_files or any(_inside(real, root) for root in policy.upload_dirs):
        return real
    raise ValueError(UPLOAD_ONLY_MSG)


def allowed_path(text: str, allowed_dirs: tuple[str, ...]) -> str:
    """The real path of a visitor's path if it lies inside a shared folder (``--allow-dir``).

    Relative paths are taken inside the first shared folder. Symbolic links are resolved first, so a
    link pointing out of the folder is refused like any outside path.

    Raises:
        ValueError: with the same message for every refused path (nothing is revealed about it).
    """
    if not allowed_dirs or "\0" in text:
        raise ValueError(NO_PATH_MSG)
    candidate = text if os.path.isabs(text) else os.path.join(allowed_dirs[0], text)
    real = os.path.realpath(candidate)
    for root in allowed_dirs:
        if _inside(real, root):
            return real
    raise ValueError(NO_PATH_MSG)


def _source_image(text: str, policy: SourcePolicy):
    if len(text) > _MAX_TEXT:
        raise ValueError("the image URL / path is too long")
    if is_url(text):
        if not policy.allow_urls:
            raise ValueError(NO_URL_MSG)
        try:
            return load_image(text, name="the URL", max_pixels=MAX_IMAGE_PIXELS, max_aspect_ratio=MAX_ASPECT_RATIO,
                              allow_private_urls=False,
                              url_deadline_s=URL_DEADLINE_S, max_url_bytes=MAX_URL_BYTES, interrupt=check_deadline)
        except (URLRefusedError, ImageTooLargeError):
            raise
        except ImageLoadError:
            raise ValueError(URL_FAILED_MSG) from None
    if not policy.allowed_dirs:
        raise ValueError(NO_SOURCE_MSG if not policy.allow_urls else NO_PATH_MSG)
    return load_image(allowed_path(text, policy.allowed_dirs), name=repr(text), max_pixels=MAX_IMAGE_PIXELS,
                      max_aspect_ratio=MAX_ASPECT_RATIO, interrupt=check_deadline)


def read_visitor_image(image: Any, image_source: str | None, policy: SourcePolicy):
    """The image a visitor gave, as RGB: an upload or example (see :func:`checked_upload`), an in-memory
    PIL image or array (library callers), or, when the server allows it, a shared-folder path or a URL.
    Messages never name server paths.

    Raises:
        ValueError: no image, a refused source, an image far from square, or an unreadable image
            (an ``ImageLoadError``).
    """
    if image is None:
        text = (image_source or "").strip()
        if not text:
            raise ValueError("upload an image, or paste an image URL or path")
        picture = _source_image(text, policy)
    elif hasattr(image, "convert"):  # a PIL image in memory
        picture = load_image(image, name="the uploaded image", max_aspect_ratio=MAX_ASPECT_RATIO)
    elif type(image).__module__ == "numpy" and hasattr(image, "ndim"):  # an array in memory
        arr = np.asarray(image)
        if arr.ndim not in (2, 3) or arr.size == 0:
            raise ValueError("the uploaded image is empty or not an image")
        picture = load_image(Image.fromarray(arr), name="the uploaded image", max_aspect_ratio=MAX_ASPECT_RATIO)
    else:
        # An upload: the path of Gradio's cached copy; do not show it to anyone.
        picture = load_image(checked_upload(image, policy), name="the uploaded image", max_pixels=MAX_IMAGE_PIXELS,
                             max_aspect_ratio=MAX_ASPECT_RATIO, interrupt=check_deadline)
    return picture


def shared_folder(path: str) -> str:
    """The real path of an ``--allow-dir`` folder.

    Raises:
        ValueError: if it is not an existing directory.
    """
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ValueError(f"--allow-dir {path!r} is not a directory")
    return real
