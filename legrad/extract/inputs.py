"""What ``legrad extract`` reads: a folder of images or a JSONL manifest, and a prompts file.

:func:`discover` turns either into a list of :class:`ImageTask` in a fixed order (sorted for a folder,
file order for a manifest), so that every ``torchrun`` rank derives the same list.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..frontend.explainer import clean_prompts
from ..io.fetch import is_url
from ..io.files import check_regular_file, read_regular_file
from ..io.images import IMAGE_EXTENSIONS, find_images

__all__ = ["ImageTask", "MAX_TEXT_BYTES", "discover", "read_prompts_file"]

#: Size limit of manifests and prompt files: 1 GiB is millions of lines; more is a mistake.
MAX_TEXT_BYTES = 1 << 30

@dataclass(frozen=True)
class ImageTask:
    """One image to explain.

    Attributes:
        index: position in the input list (the manifest order).
        image: the image as named in the input: path relative to the input folder, or the JSONL entry.
        path: where to read it (a file path or an http(s) URL).
        key: output path relative to the output folder, without ``.npz``.
        prompts: its prompts.
    """

    index: int
    image: str
    path: str
    key: str
    prompts: tuple[str, ...]


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a text file: one per line; blank lines and ``#`` comments are skipped.

    Raises:
        ValueError: if the file is missing, not a regular file, over :data:`MAX_TEXT_BYTES` or not UTF-8.
    """
    # A FIFO or a device here would block or stream forever: regular files only, opened non-blocking.
    data = read_regular_file(path, "the prompts file", MAX_TEXT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read the prompts file {os.fspath(path)!r}: {exc}") from None
    # Comments and blank lines let users annotate class lists.
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _walk_folder(root: Path) -> list[tuple[str, str]]:
    return [(rel, str(root / rel)) for rel in find_images(root)]


def _jsonl_key(image: str, base: Path) -> str:
    """Output key of a JSONL image entry: its relative path when it stays inside the manifest's folder."""
    digest = hashlib.sha1(image.encode("utf-8")).hexdigest()[:12]
    if is_url(image):
        name = image.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "image"
        return f"_urls/{digest}-{name}"
    p = Path(image)
    if not p.is_absolute() and ".." not in p.parts:
        return p.as_posix()
    resolved = (base / p).resolve()
    try:
        return resolved.relative_to(base.resolve()).as_posix()
    except ValueError:
        return f"_external/{digest}-{p.name}"


def _read_jsonl(path: Path, prompts: list[str] | None) -> list[tuple[str, str, str, list[str]]]:
    base = path.parent
    entries: list[tuple[str, str, str, list[str]]] = []
    seen: dict[str, int] = {}
    data = read_regular_file(path, "the manifest", MAX_TEXT_BYTES)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read the manifest {str(path)!r}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg}); each line must be "
                             '{"image": "path", "prompts": ["...", ...]}') from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"].strip():
            raise ValueError(f'{where}: each line needs an "image" path string, e.g. '
                             '{"image": "cats/1.jpg", "prompts": ["a cat"]}')
        image = row["image"].strip()
        if "prompts" in row:
            own = row["prompts"]
            if isinstance(own, str) or not isinstance(own, list) or not all(isinstance(p, str) for p in own):
                raise ValueError(f'{where}: "prompts" must be a list of strings')
            try:
                own = clean_prompts(own)
            except ValueError:
                raise ValueError(f'{where}: "prompts" holds no non-empty prompt') from None
        elif prompts:
            own = prompts
        else:
            raise ValueError(f'{where}: no "prompts" for this image and no global prompts; add "prompts" '
                             "to the line or pass -p/--prompts-file")
        key = _jsonl_key(image, base)
        if key in seen:
            raise ValueError(f"{where}: image {image!r} is listed again (first on line {seen[key]}); put all "
                             "its prompts on one line")
        seen[key] = lineno
        entries.append((image, image if is_url(image) or Path(image).is_absolute() else str(base / image), key, own))
    return entries


def discover(input_path: str | os.PathLike, prompts: Sequence[str] | None = None,
             limit: int | None = None) -> list[ImageTask]:
    """Lists the images of a folder (recursively, sorted) or of a JSONL manifest (in file order).

    Args:
        input_path: a folder, or a ``.jsonl`` file with one ``{"image": path, "prompts": [...]}`` per line
            (relative paths are relative to the file's folder; ``"prompts"`` may be omitted to use
            ``prompts``).
        prompts: prompts of every image without its own.
        limit: keep only the first ``limit`` images.

    Returns:
        The tasks, ``index`` numbered in order.

    Raises:
        ValueError: missing input, unreadable or malformed manifest, duplicate images, images without
            prompts, or no image at all.
    """
    src = Path(input_path)
    glob_prompts = clean_prompts(list(prompts)) if prompts else None
    if src.is_dir():
        if glob_prompts is None:
            raise ValueError("no prompts: pass -p PROMPT (repeatable) or --prompts-file FILE")
        entries = [(rel, path, rel, glob_prompts) for rel, path in _walk_folder(src)]
        if not entries:
            raise ValueError(f"no images found under {str(src)!r} (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    elif src.is_file():
        if src.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
            raise ValueError(f"INPUT {str(src)!r} must be a folder of images or a .jsonl manifest "
                             '(one {"image": path, "prompts": [...]} per line); for single images use `legrad explain`')
        entries = _read_jsonl(src, glob_prompts)
        if not entries:
            raise ValueError(f"the manifest {str(src)!r} lists no image")
    elif src.exists():
        check_regular_file(src, "INPUT")  # raises: a FIFO, device or socket, named as such
        raise ValueError(f"INPUT {str(src)!r} is not a folder or a regular file")
    else:
        raise ValueError(f"INPUT {str(src)!r} does not exist; pass a folder of images or a .jsonl manifest")
    if limit is not None:
        entries = entries[:limit]
    return [ImageTask(i, image, path, key, tuple(ps)) for i, (image, path, key, ps) in enumerate(entries)]
