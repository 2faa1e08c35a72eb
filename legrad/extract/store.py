"""What ``legrad extract`` writes: the per-image ``.npz`` layout, its validation for resuming, and records.

A per-image output holds exactly the arrays of :data:`NPZ_KEYS` (see :func:`load_output`). An output
counts as done only if :func:`valid_similarities` accepts it: same prompts, same settings, right shapes
and values, and an unchanged source file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..frontend.options import parse_size
from ..io.fetch import is_url
from ..io.files import check_regular_file, read_regular_file
from ..io.outdir import open_in_folder, write_in_folder
from .inputs import ImageTask

__all__ = ["DTYPES", "FORMAT_VERSION", "MANIFEST_NAME", "NPZ_KEYS", "check_map_size", "load_output", "output_name",
           "read_source", "record", "valid_similarities", "write_output"]

#: File name of the merged manifest inside the output folder.
MANIFEST_NAME = "manifest.jsonl"
#: Version of the per-image ``.npz`` layout (stored in each file's config; a mismatch means recompute).
FORMAT_VERSION = 3  # 2: the source file's size, mtime and hash are stored (key "source"); 3: config "weights"
#: The arrays of a per-image output, no more and no fewer: a file with other keys is recomputed.
NPZ_KEYS = frozenset({"maps", "prompts", "similarity", "image", "image_size", "input_size", "config", "source"})
#: Stored map dtypes by name (the ``dtype`` option).
DTYPES = {"float16": np.float16, "float32": np.float32}


def output_name(key: str) -> str:
    """The output file of an image key, relative to the output folder: ``key + '.npz'``."""
    return f"{key}.npz"


def check_map_size(map_size: Any) -> str | tuple[int, int]:
    """Validates a stored map size: ``'grid'``, ``'input'`` or ``N``/``(H, W)``/``'HxW'``.

    Returns:
        ``'grid'``, ``'input'`` or ``(H, W)``.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(map_size, str) and map_size.strip().lower() in ("grid", "input"):
        return map_size.strip().lower()
    try:
        hw = parse_size(map_size)
    except ValueError:
        hw = None
    if hw is None:
        raise ValueError(f"map_size must be 'grid', 'input' or HxW (e.g. 56x56), got {map_size!r}")
    return hw


def load_output(path: str | os.PathLike) -> dict[str, Any]:
    """Reads one per-image ``.npz`` written by :func:`legrad.extract.run`.

    Returns:
        ``maps`` ``[P, h, w]`` (float16/32 in [0, 1]), ``prompts`` (list of P str), ``similarity`` ``[P]``
        float32 cosine similarities, ``image`` (str, as in the manifest), ``image_size`` and ``input_size``
        (``(height, width)`` of the original and of the explained image), ``config`` (dict of the
        settings that produced it) and ``source`` (dict ``size``, ``mtime_ns``, ``sha256`` of the image
        file as it was read; None for URLs).

    Raises:
        OSError, ValueError, KeyError: if the file is missing, truncated or not such an output.
    """
    with np.load(path, allow_pickle=False) as z:
        return {
            "maps": z["maps"],
            "prompts": [str(p) for p in z["prompts"].tolist()],
            "similarity": z["similarity"],
            "image": str(z["image"][()]),
            "image_size": tuple(int(v) for v in z["image_size"]),
            "input_size": tuple(int(v) for v in z["input_size"]),
            "config": json.loads(str(z["config"][()])),
            "source": json.loads(str(z["source"][()])),
        }


def valid_similarities(out_dir: Path, name: str, task: ImageTask, config: dict, map_hw: tuple[int, int],
                       dtype: np.dtype) -> list[float] | None:
    """The stored similarities if ``out_dir/name`` is a complete output of ``task`` under ``config``, else None.

    A link (or a sub-folder link on the way) is never followed: it is no output of ours (rewriting the image
    replaces it)."""
    try:
        with open_in_folder(out_dir, name) as fh, np.load(fh, allow_pickle=False) as z:
            if set(z.files) != NPZ_KEYS:
                return None
            if json.loads(str(z["config"][()])) != config or str(z["image"][()]) != task.image:
                return None
            if [str(p) for p in z["prompts"].tolist()] != list(task.prompts):
                return None
            if not _source_unchanged(task.path, json.loads(str(z["source"][()]))):
                return None
            sim = z["similarity"]
            maps = z["maps"]  # decompressing checks the zip CRC: a damaged file fails here
            p = len(task.prompts)
            if maps.dtype != dtype or maps.shape != (p, *map_hw) or sim.shape != (p,):
                return None
            if not (np.isfinite(sim).all() and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1):
                return None
            return [float(s) for s in sim]
    except Exception:  # any unreadable or malformed file simply means "not done": recompute it
        return None


def _sha256(path: str) -> str:
    return hashlib.sha256(read_regular_file(path, "image")).hexdigest()


#: Largest image file ``legrad extract`` reads (it holds the file's bytes while hashing and decoding them);
#: the decoder's pixel limit bounds the decoded image, this bounds the compressed one.
MAX_SOURCE_BYTES = 512 * 2**20


def read_source(path: str) -> tuple[dict[str, Any] | None, bytes | None]:
    """Reads an image file once: its size, mtime and SHA-256 (for resuming) and its bytes (for decoding).

    Returns:
        ``(record, data)``; ``(None, None)`` for a URL (nothing to record; the loader fetches it).

    Raises:
        ValueError: if ``path`` is missing or not a regular file (a FIFO would block the loader), or larger
            than :data:`MAX_SOURCE_BYTES`.
    """
    if is_url(path):
        return None, None
    st = check_regular_file(path, "image")
    data = read_regular_file(path, "image", max_bytes=MAX_SOURCE_BYTES)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": hashlib.sha256(data).hexdigest()}, data


def _source_unchanged(path: str, stored: Any) -> bool:
    """Whether the image file is still the one an output was computed from.

    Size and mtime equal: unchanged (no read, so resuming stays cheap). Same size but another mtime
    (a touch, a copy): the content hash decides. A URL has nothing to compare.
    """
    if is_url(path):
        return stored is None
    if not isinstance(stored, dict):
        return False
    try:
        st = check_regular_file(path, "image")
        if st.st_size != stored.get("size"):
            return False
        return st.st_mtime_ns == stored.get("mtime_ns") or _sha256(path) == stored.get("sha256")
    except (ValueError, OSError):
        return False


def write_output(out_dir: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Writes one per-image ``.npz`` ``out_dir/name`` (the :data:`NPZ_KEYS` arrays) atomically and durably,
    never through a link inside ``out_dir`` (:func:`~legrad.io.outdir.write_in_folder`).

    Raises:
        OSError: if it cannot be written (no partial file is left under its name);
            :class:`~legrad.io.outdir.LinkInFolderError` if a sub-folder on its way is a symbolic link.
    """
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with write_in_folder(out_dir, name) as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        # Durable before the rename, so that after a crash an existing .npz is a complete one.
        os.fsync(fh.fileno())


def record(task: ImageTask, similarity: list[float] | None, error: str | None) -> dict[str, Any]:
    """The manifest line of one image (without its input position)."""
    return {
        "image": task.image,
        "output": output_name(task.key) if error is None else None,
        "prompts": list(task.prompts),
        "similarity": None if similarity is None else [round(float(s), 6) for s in similarity],
        "status": "ok" if error is None else "error",
        "error": error,
    }
