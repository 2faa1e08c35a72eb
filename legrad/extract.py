"""Dataset-scale LeGrad extraction: one ``.npz`` of heatmaps per image, resumable, on ``torch.distributed``.

``run`` walks a folder (or reads a JSONL manifest), explains every image against its prompts and writes

* ``OUT/<image path>.npz`` per image (see :func:`load_output` for the keys), written atomically, and
* ``OUT/manifest.jsonl``: one line per image, in input order, with the output file, the prompts, the
  image-text cosine similarities, ``status`` (``"ok"`` or ``"error"``) and the error message.

Rerunning the same command skips every image whose ``.npz`` exists and validates (readable, same prompts,
same settings, right shapes, same source file: size and mtime, else content hash), so an interrupted run
continues where it stopped and a changed image is explained again. Launched by ``torchrun``
(``WORLD_SIZE`` > 1 in the environment), each rank takes the images ``rank::world_size`` of the input
list, uses ``cuda:LOCAL_RANK`` when CUDA is available (NCCL) or the CPU (gloo), writes its own manifest
shard, and rank 0 merges the shards after a barrier. Per-image results do not depend on the number of
processes (up to floating-point batching noise).
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .explainer import Explainer, clean_prompts
from .heatmap import min_max
from .io_utils import atomic_writer, check_regular_file, read_regular_file
from .loading import IMAGE_EXTENSIONS, TOY_NAME, load_image, parse_size, resolve_device
from .preprocess import LePreprocess

__all__ = ["ImageTask", "ExtractResult", "check_map_size", "default_workers", "discover", "load_output", "output_name",
           "run", "MANIFEST_NAME"]

logger = logging.getLogger(__name__)

#: File name of the merged manifest inside the output folder.
MANIFEST_NAME = "manifest.jsonl"
#: Version of the per-image ``.npz`` layout (stored in each file's config; a mismatch means recompute).
FORMAT_VERSION = 2  # 2: the source file's size, mtime and hash are stored (key "source")

# Image file extensions found when walking a folder (same set as `legrad explain`).
_NPZ_KEYS = frozenset({"maps", "prompts", "similarity", "image", "image_size", "input_size", "config", "source"})
_DTYPES = {"float16": np.float16, "float32": np.float32}
_PROMPT_CHUNK = 256  # prompts per text-encoder batch
_SHARD_GLOB = ".manifest.rank*.jsonl"
_MAX_TEXT_BYTES = 1 << 30  # manifests and prompt files: 1 GiB is millions of lines; more is a mistake


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


@dataclass
class ExtractResult:
    """Summary of :func:`run` (identical on every rank, except ``failures``).

    Attributes:
        total: images in the input (after ``limit``).
        computed: images explained by this run.
        skipped: images whose valid output already existed.
        failed: images that could not be read or explained (see the manifest).
        out_dir: the output folder.
        manifest: path of ``manifest.jsonl``.
        seconds: wall time of the extraction loop (after model loading and the resume check).
        rank: this process's rank.
        world_size: number of processes.
        failures: ``(image, error)`` pairs: all of them on rank 0, this rank's own elsewhere.
    """

    total: int
    computed: int
    skipped: int
    failed: int
    out_dir: Path
    manifest: Path
    seconds: float
    rank: int = 0
    world_size: int = 1
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every image has a valid output."""
        return self.failed == 0

    @property
    def images_per_second(self) -> float:
        """Explained images per second over all processes (0 when nothing was computed)."""
        return self.computed / self.seconds if self.seconds > 0 and self.computed else 0.0


# ---------------------------------------------------------------------------------------------- inputs
def output_name(key: str) -> str:
    """The output file of an image key, relative to the output folder: ``key + '.npz'``."""
    return f"{key}.npz"


def _read_prompts_file(path: str | os.PathLike) -> list[str]:
    # A FIFO or a device here would block or stream forever: regular files only, opened non-blocking.
    data = read_regular_file(path, "the prompts file", _MAX_TEXT_BYTES)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read the prompts file {os.fspath(path)!r}: {exc}") from None
    # One prompt per line; blank lines and '#' comments let users annotate class lists.
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _walk_folder(root: Path) -> list[tuple[str, str]]:
    found = sorted(
        f.relative_to(root).as_posix()
        for f in root.rglob("*")
        if f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in f.relative_to(root).parts)
        and f.is_file()
    )
    return [(rel, str(root / rel)) for rel in found]


def _jsonl_key(image: str, base: Path) -> str:
    """Output key of a JSONL image entry: its relative path when it stays inside the manifest's folder."""
    digest = hashlib.sha1(image.encode("utf-8")).hexdigest()[:12]
    if re.match(r"^https?://", image, flags=re.IGNORECASE):
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
    data = read_regular_file(path, "the manifest", _MAX_TEXT_BYTES)
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
        is_url = _is_url(image)
        entries.append((image, image if is_url or Path(image).is_absolute() else str(base / image), key, own))
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


# ---------------------------------------------------------------------------------------------- outputs
def load_output(path: str | os.PathLike) -> dict[str, Any]:
    """Reads one per-image ``.npz`` written by :func:`run`.

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


def _valid_similarities(path: Path, task: ImageTask, config: dict, map_hw: tuple[int, int],
                        dtype: np.dtype) -> list[float] | None:
    """The stored similarities if ``path`` is a complete output of ``task`` under ``config``, else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if set(z.files) != _NPZ_KEYS:
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


def _is_url(path: str) -> bool:
    return re.match(r"^https?://", path, flags=re.IGNORECASE) is not None


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    h.update(read_regular_file(path, "image"))
    return h.hexdigest()


def _source_record(path: str) -> dict[str, Any] | None:
    """Size, mtime and SHA-256 of an image file, read before it is decoded (None for URLs).

    Raises:
        ValueError: if ``path`` is missing or not a regular file (a FIFO would block the loader).
    """
    if _is_url(path):
        return None
    st = check_regular_file(path, "image")
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _source_unchanged(path: str, stored: Any) -> bool:
    """Whether the image file is still the one an output was computed from.

    Size and mtime equal: unchanged (no read, so resuming stays cheap). Same size but another mtime
    (a touch, a copy): the content hash decides. A URL has nothing to compare.
    """
    if _is_url(path):
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


def _write_output(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_writer(path) as fh:
        fh.write(buf.getbuffer())
        fh.flush()
        # Durable before the rename, so that after a crash an existing .npz is a complete one.
        os.fsync(fh.fileno())


def _record(task: ImageTask, similarity: list[float] | None, error: str | None) -> dict[str, Any]:
    return {
        "image": task.image,
        "output": output_name(task.key) if error is None else None,
        "prompts": list(task.prompts),
        "similarity": None if similarity is None else [round(float(s), 6) for s in similarity],
        "status": "ok" if error is None else "error",
        "error": error,
    }


# ---------------------------------------------------------------------------------------------- loading
class _ImageDataset(Dataset):
    """Decodes and preprocesses images in DataLoader workers; a failure becomes an error entry, never an exception."""

    def __init__(self, tasks: list[ImageTask], heat_transform: Any, clip_transform: Any):
        self.tasks = tasks
        self.heat_transform = heat_transform
        self.clip_transform = clip_transform

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        task = self.tasks[i]
        try:
            # Recorded before decoding: if the file changes meanwhile, the next resume sees a mismatch.
            source = _source_record(task.path)
            image = load_image(task.path)
            return {"pos": i, "heat": self.heat_transform(image), "clip": self.clip_transform(image),
                    "size": (image.height, image.width), "source": source, "error": None}
        except Exception as exc:  # one bad image must not kill the batch: report it instead
            msg = " ".join(str(exc).split()) or type(exc).__name__
            return {"pos": i, "heat": None, "clip": None, "size": None, "source": None, "error": msg[:300]}


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [it for it in items if it["error"] is None]
    return {
        "pos": [it["pos"] for it in ok],
        "heat": torch.stack([it["heat"] for it in ok]) if ok else None,
        "clip": torch.stack([it["clip"] for it in ok]) if ok else None,
        "sizes": [it["size"] for it in ok],
        "sources": [it["source"] for it in ok],
        "errors": [(it["pos"], it["error"]) for it in items if it["error"] is not None],
    }


# ---------------------------------------------------------------------------------------------- compute
def _heatmaps(wrapper: Any, image: torch.Tensor, text: torch.Tensor, start: int,
              map_hw: tuple[int, int]) -> torch.Tensor:
    """``[B, P, h, w]`` float32 maps in [0, 1] at ``map_hw``.

    At the patch grid they are ``compute_legrad(..., output_size='grid')``: upsampled bilinearly to the
    input size and min-max normalised again they are exactly ``compute_legrad``'s maps. Families with
    their own input handling (``run_legrad``) only return input-size maps, which are resized here.
    """
    adapter = wrapper.adapter
    if getattr(adapter, "run_legrad", None) is not None:
        maps = wrapper.compute_legrad(text, image=image, layer_index=start)
        if tuple(maps.shape[-2:]) != tuple(map_hw):
            maps = min_max(F.interpolate(maps, size=map_hw, mode="bilinear", antialias=True, align_corners=False))
        return maps.float()
    grid = adapter.grid_size(*image.shape[-2:])
    output_size = "grid" if tuple(map_hw) == tuple(grid) else tuple(map_hw)
    return wrapper.compute_legrad(text, image=image, layer_index=start, output_size=output_size)


class _PromptTable:
    """Normalised text embeddings, encoded once in fixed chunks of the sorted prompt list.

    Chunks are fixed by the global list so that a prompt's embedding is bit-identical on every rank;
    each rank encodes only the chunks holding prompts it needs.
    """

    def __init__(self, explainer: Explainer, all_prompts: list[str], needed: set[str]):
        order = sorted(set(all_prompts))
        chunks = sorted({i // _PROMPT_CHUNK for i, p in enumerate(order) if p in needed})
        self.row: dict[str, int] = {}
        pieces = []
        for c in chunks:
            names = order[c * _PROMPT_CHUNK:(c + 1) * _PROMPT_CHUNK]
            with torch.inference_mode():
                pieces.append(explainer.encode_prompts(names).float())
            for name in names:
                self.row[name] = len(self.row)
        self.table = torch.cat(pieces).clone() if pieces else None  # clone: out of inference mode

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        return torch.tensor([self.row[p] for p in prompts], dtype=torch.long)


# ---------------------------------------------------------------------------------------------- distributed
class _Dist:
    """This process's place in a ``torch.distributed`` job (or a single process)."""

    def __init__(self, rank: int, world: int, device: str, owns_group: bool):
        self.rank, self.world, self.device, self.owns_group = rank, world, device, owns_group

    @classmethod
    def start(cls, device: str) -> _Dist:
        import torch.distributed as dist

        env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        initialized = dist.is_available() and dist.is_initialized()
        if not initialized and env_world <= 1:
            return cls(0, 1, resolve_device(device), False)
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
        dev = (device or "auto").strip().lower()
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda":
            dev = f"cuda:{local_rank}"
        dev = resolve_device(dev)
        if initialized:
            return cls(dist.get_rank(), dist.get_world_size(), dev, False)
        if dev.startswith("cuda"):
            torch.cuda.set_device(torch.device(dev))
        dist.init_process_group(backend="nccl" if dev.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), dev, True)

    def _collective_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device(self.device) if dist.get_backend() == "nccl" else torch.device("cpu")

    def reduce(self, values: Sequence[int], op: str = "sum") -> list[int]:
        """Element-wise sum (or max) of ``values`` over all ranks."""
        if self.world == 1:
            return [int(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.int64, device=self._collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return [int(v) for v in t.tolist()]

    def barrier(self) -> None:
        if self.world > 1:
            self.reduce([0])  # an all-reduce is a barrier that works the same on gloo and NCCL

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- options
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


def default_workers() -> int:
    """DataLoader workers per process when none are asked for: from the cores this process may use.

    The cores (``os.sched_getaffinity`` where available, so CPU sets and container limits count) are
    shared by the ``LOCAL_WORLD_SIZE`` processes of a torchrun node. One core stays with the process
    that runs the model; with 2 cores or fewer per process, images are decoded in the main process
    (PyTorch warns about more workers than cores). At most 4: decoding rarely needs more.

    Returns:
        An int in [0, 4].
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        local_world = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    except ValueError:
        local_world = 1
    per_process = cores // local_world
    return 0 if per_process <= 2 else min(4, per_process - 1)


def _check_options(batch_size: int, workers: int | None, dtype: str, limit: int | None) -> None:
    checks = [("batch_size", batch_size, 1)] + ([("workers", workers, 0)] if workers is not None else [])
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


# ---------------------------------------------------------------------------------------------- run
def run(
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    *,
    prompts_file: str | os.PathLike | None = None,
    model: str | Explainer = TOY_NAME,
    pretrained: str | None = None,
    size: int | tuple[int, int] | str | None = None,
    layer_index: int | None = None,
    batch_size: int = 8,
    workers: int | None = None,
    map_size: str | int | tuple[int, int] = "grid",
    dtype: str = "float16",
    device: str = "auto",
    limit: int | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Explains every image of a folder or JSONL manifest; resumable; distributed under ``torchrun``.

    Args:
        input_path: a folder (walked recursively, sorted) or a ``.jsonl`` manifest (see :func:`discover`).
        out: output folder (``<image>.npz`` per image and ``manifest.jsonl``).
        prompts: prompts of every image (JSONL lines may carry their own).
        prompts_file: text file with one more prompt per line (blank lines and ``#`` comments ignored).
        model: ``'toy'`` (bundled demo model), an OpenCLIP model name, or a ready :class:`~legrad.explainer.Explainer`.
        pretrained: pretrained tag or checkpoint path (see :func:`legrad.loading.load_model`).
        size: explained image size, ``N`` or ``(H, W)`` or ``'HxW'``, multiple of the patch size (default native).
        layer_index: first explained block (default: the model's recommended).
        batch_size: images per batch.
        workers: DataLoader worker processes decoding and preprocessing images (0: in the main process;
            None: :func:`default_workers`).
        map_size: stored map resolution: ``'grid'`` (patch grid, default, smallest), ``'input'`` (the
            explained size, equal to ``compute_legrad``) or ``(h, w)``/``'HxW'``.
        dtype: stored map dtype, ``'float16'`` (default) or ``'float32'``.
        device: ``'auto'``, ``'cpu'`` or ``'cuda'``; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``.
        limit: only the first ``limit`` images of the input (to try settings on a sample).
        progress: show a progress bar (rank 0).

    Returns:
        An :class:`ExtractResult`.

    Raises:
        ValueError, TypeError: bad arguments or input (before any work).
        ModelLoadError: when the model cannot be loaded.
    """
    _check_options(batch_size, workers, dtype, limit)
    if workers is None:
        workers = default_workers()
    map_spec = check_map_size(map_size)
    size_hw = parse_size(size)
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, e.g. ['a cat'] (not a single string)")
    glob_prompts = list(prompts or [])
    if prompts_file is not None:
        glob_prompts += _read_prompts_file(prompts_file)
    tasks = discover(input_path, glob_prompts or None, limit)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a folder")

    ctx = _Dist.start(device)
    try:
        if isinstance(model, Explainer):
            explainer = model
        elif isinstance(model, str):
            explainer = Explainer.load(model, pretrained, ctx.device, layer_index)
        else:
            raise TypeError(f"model must be a model name or an Explainer, got {type(model).__name__}")
        input_hw = explainer.check_size(size_hw)
        start = explainer.check_layer_index(layer_index) % explainer.wrapper.adapter.depth
        map_hw = (explainer.wrapper.adapter.grid_size(*input_hw) if map_spec == "grid"
                  else input_hw if map_spec == "input" else map_spec)
        config = {
            "format": FORMAT_VERSION,
            "model": explainer.name if isinstance(model, Explainer) else model,
            "pretrained": None if isinstance(model, Explainer) else pretrained,
            "layer": start,
            "input_size": list(input_hw),
            "map_size": map_spec if isinstance(map_spec, str) else list(map_spec),
            "dtype": dtype,
        }
        return _extract(ctx, explainer, tasks, out_dir, config, input_hw, start, map_hw, np.dtype(_DTYPES[dtype]),
                        batch_size, workers, progress)
    finally:
        ctx.close()


def _extract(ctx: _Dist, explainer: Explainer, tasks: list[ImageTask], out_dir: Path, config: dict,
             input_hw: tuple[int, int], start: int, map_hw: tuple[int, int], dtype: np.dtype,
             batch_size: int, workers: int, progress: bool) -> ExtractResult:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    mine = tasks[ctx.rank::ctx.world]

    # Resume: outputs that exist and validate are done (checked in threads: zlib releases the GIL).
    def check(task: ImageTask) -> list[float] | None:
        return _valid_similarities(out_dir / output_name(task.key), task, config, map_hw, dtype)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 8))) as pool:
        existing = list(pool.map(check, mine))
    done = {t.index: sim for t, sim in zip(mine, existing) if sim is not None}
    todo = [t for t in mine if t.index not in done]

    prompts = _PromptTable(explainer, [p for t in tasks for p in t.prompts], {p for t in todo for p in t.prompts})
    device = explainer.device
    model = explainer.wrapper.model
    model_dtype = explainer._dtype()

    records: dict[int, dict[str, Any]] = {t.index: _record(t, done[t.index], None) for t in mine if t.index in done}
    failures: list[tuple[str, str]] = []
    computed = 0

    loader = None
    if todo:
        dataset = _ImageDataset(todo, LePreprocess(explainer.preprocess, input_hw), explainer.preprocess)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=_collate, pin_memory=device.type == "cuda")
    if ctx.rank == 0:
        _remove_stale_temps(out_dir)  # before the collective below, i.e. before any rank writes
    n_local = len(loader) if loader is not None else 0
    n_steps, = ctx.reduce([n_local], op="max")
    g_skipped, = ctx.reduce([len(done)])

    bar = tqdm(total=len(tasks), initial=g_skipped, unit="img", desc="extract", file=sys.stderr,
               disable=not progress or ctx.rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    with bar, (logging_redirect_tqdm() if ctx.rank == 0 and progress else contextlib.nullcontext()):

        def finish(task: ImageTask, sim: list[float] | None, error: str | None) -> None:
            records[task.index] = _record(task, sim, error)
            if error is not None:
                failures.append((task.image, error))
                logger.warning("failed %s: %s", task.image, error)

        batches: Iterator[dict[str, Any]] = iter(loader) if loader is not None else iter(())
        for _ in range(n_steps):
            batch = next(batches, None)
            finished = 0
            if batch is not None:
                for pos, err in batch["errors"]:
                    finish(todo[pos], None, err)
                finished += len(batch["errors"])
                if batch["pos"]:
                    n_ok = _process_batch(batch, todo, explainer, model, model_dtype, device, prompts, start,
                                          map_hw, dtype, out_dir, config, finish)
                    computed += n_ok
                    finished += len(batch["pos"])
            # Lock-step count of finished images: keeps rank 0's bar global with plain collectives.
            g_finished, = ctx.reduce([finished])
            bar.update(g_finished)
    seconds = time.perf_counter() - t0

    # This rank's shard, done images included (the manifest is rebuilt from the outputs on every run),
    # sorted by input position so that rank 0 can merge the shards as streams.
    shard = out_dir / _shard_name(ctx.rank, ctx.world)
    with atomic_writer(shard) as fh:
        for index in sorted(records):
            fh.write((json.dumps({"index": index, **records[index]}) + "\n").encode("utf-8"))
    g_computed, g_failed = ctx.reduce([computed, len(failures)])
    manifest = out_dir / MANIFEST_NAME
    if ctx.rank == 0:
        failures = _merge_shards(out_dir, ctx.world, manifest)
    ctx.barrier()  # the merged manifest exists on every rank's return
    result = ExtractResult(total=len(tasks), computed=g_computed, skipped=g_skipped, failed=g_failed,
                           out_dir=out_dir, manifest=manifest, seconds=seconds, rank=ctx.rank,
                           world_size=ctx.world, failures=failures)
    logger.info("extract: %d images, %d computed, %d already done, %d failed (%.2f images/s)", result.total,
                result.computed, result.skipped, result.failed, result.images_per_second)
    return result


def _process_batch(batch: dict[str, Any], todo: list[ImageTask], explainer: Explainer, model: Any,
                   model_dtype: torch.dtype, device: torch.device, prompts: _PromptTable, start: int,
                   map_hw: tuple[int, int], dtype: np.dtype, out_dir: Path, config: dict, finish: Any) -> int:
    """Explains one batch of decoded images, writes their outputs and reports each through ``finish``."""
    items = [todo[p] for p in batch["pos"]]
    rows = [prompts.rows(t.prompts) for t in items]
    try:
        table = prompts.table.to(device)
        if all(t.prompts == items[0].prompts for t in items):
            text = table[rows[0].to(device)]  # [P, D], shared
        else:
            # Per-image prompt lists: pad each to the longest with its first prompt, drop the padding after.
            width = max(len(r) for r in rows)
            padded = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])
            text = table[padded.to(device)]  # [B, Pmax, D]
        with torch.no_grad():
            emb = model.encode_image(batch["clip"].to(device, model_dtype, non_blocking=True))
            emb = F.normalize(emb.float(), dim=-1)
        maps = _heatmaps(explainer.wrapper, batch["heat"].to(device, non_blocking=True), text, start, map_hw)
        maps = maps.cpu().numpy()
        sims = [(table[r.to(device)] @ emb[b]).cpu().numpy().astype(np.float32) for b, r in enumerate(rows)]
    except (RuntimeError, ValueError, MemoryError) as exc:  # e.g. out of memory
        if len(items) > 1:
            # Each image alone: one that cannot be explained must not cost the rest of its batch.
            del exc
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return sum(
                _process_batch({"pos": [pos], "heat": batch["heat"][b:b + 1], "clip": batch["clip"][b:b + 1],
                                "sizes": batch["sizes"][b:b + 1], "sources": batch["sources"][b:b + 1]},
                               todo, explainer, model, model_dtype, device, prompts, start, map_hw, dtype,
                               out_dir, config, finish)
                for b, pos in enumerate(batch["pos"]))
        msg = "explaining failed: " + (" ".join(str(exc).split())[:240] or type(exc).__name__)
        finish(items[0], None, msg)
        return 0
    n_ok = 0
    for b, t in enumerate(items):
        p = len(t.prompts)
        arrays = {
            "maps": maps[b, :p].astype(dtype),
            "prompts": np.array(list(t.prompts), dtype=str),
            "similarity": sims[b],
            "image": np.array(t.image),
            "image_size": np.array(batch["sizes"][b], dtype=np.int32),
            "input_size": np.array(config["input_size"], dtype=np.int32),
            "config": np.array(json.dumps(config, sort_keys=True)),
            "source": np.array(json.dumps(batch["sources"][b], sort_keys=True)),
        }
        try:
            _write_output(out_dir / output_name(t.key), arrays)
        except OSError as exc:
            finish(t, None, f"could not write {output_name(t.key)}: {exc}")
            continue
        finish(t, sims[b].tolist(), None)
        n_ok += 1
    return n_ok


def _shard_name(rank: int, world: int) -> str:
    return f".manifest.rank{rank:05d}-of-{world:05d}.jsonl"


def _remove_stale_temps(out_dir: Path) -> None:
    """Deletes temp files a killed run left behind (``atomic_writer`` names them ``.<name>.<random>.tmp``)."""
    for pattern in ("**/.*.npz.*.tmp", f".{MANIFEST_NAME}.*.tmp", f".{_SHARD_GLOB}.*.tmp"):
        for tmp in out_dir.glob(pattern):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _merge_shards(out_dir: Path, world: int, manifest: Path) -> list[tuple[str, str]]:
    """Merges the ranks' shards (each in input order) into ``manifest`` atomically; returns the failures."""
    shards = [out_dir / _shard_name(r, world) for r in range(world)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise RuntimeError(f"manifest shards missing after the barrier: {missing}; is --out on a filesystem "
                           "shared by all nodes?")
    failures: list[tuple[str, str]] = []
    handles = [s.open(encoding="utf-8") for s in shards]
    try:
        streams = [(json.loads(line) for line in fh if line.strip()) for fh in handles]
        with atomic_writer(manifest) as out:
            for rec in heapq.merge(*streams, key=lambda r: r["index"]):
                rec.pop("index")
                if rec["status"] != "ok":
                    failures.append((rec["image"], rec["error"]))
                out.write((json.dumps(rec) + "\n").encode("utf-8"))
    finally:
        for fh in handles:
            fh.close()
    # Shards of this run, and stale ones of interrupted runs with another world size.
    for stale in out_dir.glob(_SHARD_GLOB):
        with contextlib.suppress(OSError):
            stale.unlink()
    return failures
