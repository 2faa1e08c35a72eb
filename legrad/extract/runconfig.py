"""The configuration an output folder of ``legrad extract`` holds results of, and what identifies the weights.

``OUT/legrad-extract.json`` records the settings of the run that last wrote into the folder: the per-image
``config`` (format, model, pretrained, weights, layer, sizes, dtype) and the prompts given for every image.
A run whose configuration differs is refused before any work (its outputs would replace the others'
under the same names) unless it is asked to overwrite them. A checkpoint file given as ``pretrained`` is
identified by its content's SHA-256 and size (the path alone, or its size and mtime, would let replaced
weights pass for the old ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

from ..io.files import open_regular_file
from ..io.outdir import LinkInFolderError, open_in_folder, write_in_folder

__all__ = ["RUN_CONFIG_NAME", "check_run_config", "weights_identity", "write_run_config"]

#: File name of the run configuration inside the output folder.
RUN_CONFIG_NAME = "legrad-extract.json"
_MAX_BYTES = 16 * 2**20
_CHUNK = 8 * 2**20
#: A recorded hash is trusted only for a file whose ctime is older than its hashing by this much (coarse
#: timestamps: 2 s covers FAT and network filesystems).
_RACY_NS = 2 * 10**9


def _stat_key(st: os.stat_result) -> dict[str, int]:
    """What changes when a file's content may have: any write or rename changes ``ctime``, which, unlike
    ``mtime``, a user cannot set back (``os.utime`` sets it to now)."""
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino,
            "device": st.st_dev}


def weights_identity(pretrained: str | None, folder: Path) -> dict[str, Any] | None:
    """The identity of a checkpoint file given as ``pretrained`` (None for a tag): its content's SHA-256.

    Returns ``{"file", "size", "mtime_ns", "ctime_ns", "inode", "device", "hashed_at_ns", "sha256"}``. The
    hash recorded in ``folder``'s run configuration is reused (resuming then reads no gigabytes of weights
    again) only for the same file as it was then: same path, inode, device, size, mtime *and* ctime, and
    a ctime older than the hashing by more than :data:`_RACY_NS` (a file changed within the timestamp
    granularity of its hashing could show the same ctime). A file swapped for another of the same size and
    mtime is therefore hashed again: its ctime or inode differs.

    Raises:
        ValueError: if the checkpoint cannot be read.
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
    # The stat and the bytes hashed are those of one open file: a swap between the two cannot mix them.
    with open_regular_file(path, f"the weights {path!r}") as fh:
        key = _stat_key(os.fstat(fh.fileno()))
        if (isinstance(old, dict) and old.get("file") == path and all(old.get(k) == v for k, v in key.items())
                and isinstance(old.get("hashed_at_ns"), int) and isinstance(old.get("sha256"), str)
                and old["hashed_at_ns"] - key["ctime_ns"] > _RACY_NS):
            return {"file": path, **key, "hashed_at_ns": old["hashed_at_ns"], "sha256": old["sha256"]}
        hashed_at = time.time_ns()
        h = hashlib.sha256()
        try:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        except OSError as exc:
            raise ValueError(f"the weights {path!r} cannot be read ({exc.strerror or exc})") from None
    return {"file": path, **key, "hashed_at_ns": hashed_at, "sha256": h.hexdigest()}


def _read(folder: Path) -> dict[str, Any] | None:
    """The recorded run configuration; ``{"unreadable": reason}`` if it cannot be used; None if there is none."""
    try:
        with open_in_folder(folder, RUN_CONFIG_NAME) as fh:
            raw = fh.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except LinkInFolderError as exc:  # never followed: its target's content must not reach a message
        return {"unreadable": exc.strerror}
    except OSError as exc:
        return {"unreadable": f"{str(folder / RUN_CONFIG_NAME)!r} cannot be read ({exc.strerror or exc})"}
    try:
        if len(raw) > _MAX_BYTES:
            raise ValueError("too large")
        data = json.loads(raw.decode("utf-8"))
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
        why = old["unreadable"] if isinstance(old["unreadable"], str) else f"{where} is damaged"
        return (f"{why}, so the configuration of the results in this folder is unknown; pass --overwrite "
                "(overwrite=True) to replace them, or choose another --out")
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
    with write_in_folder(folder, RUN_CONFIG_NAME) as fh:
        fh.write((json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))
