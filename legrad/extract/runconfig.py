"""The configuration an output folder of ``legrad extract`` holds results of, and what identifies the weights.

``OUT/legrad-extract.json`` records the settings of the run that last wrote into the folder: the per-image
``config`` (format, model, pretrained, weights, layer, sizes, dtype) and the prompts given for every image.
A run whose configuration differs is refused before any work (its outputs would replace the others'
under the same names) unless it is asked to overwrite them. A checkpoint file given as ``pretrained`` is
identified by its SHA-256 and size (the path alone would let replaced weights pass for the old ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from ..io.files import atomic_writer, read_regular_file

__all__ = ["RUN_CONFIG_NAME", "check_run_config", "weights_identity", "write_run_config"]

#: File name of the run configuration inside the output folder.
RUN_CONFIG_NAME = "legrad-extract.json"
_MAX_BYTES = 16 * 2**20
_CHUNK = 8 * 2**20


def weights_identity(pretrained: str | None, folder: Path) -> dict[str, Any] | None:
    """``{"file", "size", "mtime_ns", "sha256"}`` of a checkpoint file given as ``pretrained``; None for a tag.

    The hash of the same file (same absolute path, size and mtime) recorded in ``folder``'s run
    configuration is reused, so that resuming does not read gigabytes of weights again.
    """
    if pretrained is None:
        return None
    try:
        st = os.stat(pretrained)
    except (OSError, ValueError):
        return None  # a pretrained tag, not a file
    if not stat.S_ISREG(st.st_mode):
        return None
    path = os.path.abspath(pretrained)
    old = (_read(folder) or {}).get("weights_file")
    if (isinstance(old, dict) and old.get("file") == path and old.get("size") == st.st_size
            and old.get("mtime_ns") == st.st_mtime_ns and isinstance(old.get("sha256"), str)):
        digest = old["sha256"]
    else:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        digest = h.hexdigest()
    return {"file": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}


def _read(folder: Path) -> dict[str, Any] | None:
    path = folder / RUN_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(read_regular_file(path, "run configuration", _MAX_BYTES).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [k for k in keys if old.get(k) != new.get(k)]
    shown = []
    for k in diffs[:4]:
        a, b = json.dumps(old.get(k))[:80], json.dumps(new.get(k))[:80]
        shown.append(f"{k}: {a} -> {b}")
    return "; ".join(shown)


def check_run_config(folder: Path, run_config: dict[str, Any], overwrite: bool) -> str | None:
    """Why a run of ``run_config`` must not write into ``folder``, or None if it may.

    Args:
        folder: the output folder.
        run_config: ``{"config": ..., "prompts": ...}`` of this run.
        overwrite: whether the user allowed replacing another configuration's results.
    """
    old = _read(folder)
    if old is None or overwrite:
        return None
    where = str(folder / RUN_CONFIG_NAME)
    if old.get("unreadable"):
        return (f"{where} is damaged, so the configuration of the results in this folder is unknown; pass "
                "--overwrite (overwrite=True) to replace them, or choose another --out")
    previous = {k: old.get(k) for k in ("config", "prompts")}
    if previous == run_config:
        return None
    a = {**(previous["config"] or {}), "prompts": previous["prompts"]}
    b = {**run_config["config"], "prompts": run_config["prompts"]}
    return (f"--out {str(folder)!r} holds results of another configuration ({_describe(a, b)}); rerun with the "
            "same settings to resume, choose another --out, or pass --overwrite (overwrite=True) to replace them")


def write_run_config(folder: Path, run_config: dict[str, Any], weights_file: dict[str, Any] | None) -> None:
    """Records ``run_config`` (and the weights file's stat, for :func:`weights_identity`) atomically.

    Raises:
        OSError: if it cannot be written.
    """
    data = {**run_config, "weights_file": weights_file}
    with atomic_writer(folder / RUN_CONFIG_NAME) as fh:
        fh.write((json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))
