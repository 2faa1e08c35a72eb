"""The ``legrad extract`` run: options, the resume check, the batch loop and the merged manifest.

Named ``runner`` rather than ``run`` so that the module never shadows :func:`legrad.extract.run`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import heapq
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..frontend.explainer import Explainer, clean_prompts
from ..frontend.loop import progress_bar
from ..frontend.models import TOY_NAME
from ..frontend.options import parse_size
from ..io.outdir import (
    FolderLock,
    OutputFolderError,
    is_file_in_folder,
    open_in_folder,
    prepare_output_folder,
    write_in_folder,
)
from ..preprocess import LePreprocess
from .compute import PromptTable, explain_batch
from .data import ImageDataset, collate, default_workers
from .distributed import Dist
from .inputs import ImageTask, discover, read_prompts_file
from .runconfig import check_run_config, weights_identity, write_run_config
from .store import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST_NAME,
    check_map_size,
    output_name,
    record,
    valid_similarities,
)

__all__ = ["ExtractResult", "run"]

logger = logging.getLogger(__name__)

_SHARD_GLOB = ".manifest.rank*.jsonl"


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


def _check_options(batch_size: int, workers: int | None, dtype: str, limit: int | None) -> None:
    checks = [("batch_size", batch_size, 1)] + ([("workers", workers, 0)] if workers is not None else [])
    for name, value, low in checks:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


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
    overwrite: bool = False,
) -> ExtractResult:
    """Explains every image of a folder or JSONL manifest; resumable; distributed under ``torchrun``.

    Args:
        input_path: a folder (walked recursively, sorted) or a ``.jsonl`` manifest (see :func:`discover`).
        out: output folder (``<image>.npz`` per image and ``manifest.jsonl``).
        prompts: prompts of every image (JSONL lines may carry their own).
        prompts_file: text file with one more prompt per line (blank lines and ``#`` comments ignored).
        model: ``'toy'`` (bundled demo model), an OpenCLIP model name, or a ready :class:`~legrad.frontend.explainer.Explainer`.
        pretrained: pretrained tag or checkpoint path (see :func:`legrad.frontend.models.load_model`).
        size: explained image size, ``N`` or ``(H, W)`` or ``'HxW'``, multiple of the patch size (default native).
        layer_index: first explained block (default: the model's recommended).
        batch_size: images per batch.
        workers: DataLoader worker processes decoding and preprocessing images (0: in the main process;
            None: :func:`default_workers`).
        map_size: stored map resolution: ``'grid'`` (patch grid, default, smallest), ``'input'`` (the
            explained size, equal to ``compute_legrad``) or ``(h, w)``/``'HxW'``.
        dtype: stored map dtype, ``'float16'`` (default) or ``'float32'``.
        device: ``'auto'``, ``'cpu'`` or ``'cuda'``; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``.
        limit: only the first ``limit`` images (to try settings on a sample).
        progress: show a progress bar (rank 0).
        overwrite: allow writing into a folder holding results of another configuration (other prompts,
            model, weights, sizes or dtype; recorded in ``OUT/legrad-extract.json``); without it such a
            run is refused before any work.

    Returns:
        An :class:`ExtractResult`.

    Raises:
        ValueError, TypeError: bad arguments or input (before any work).
        OutputFolderError: (a ValueError) ``out`` is not a writable folder, another run holds it
            (:class:`~legrad.io.outdir.FolderBusyError`), or it holds another configuration's results.
        ModelLoadError: when the model cannot be loaded.
        OSError: when the manifest cannot be written at the end (full disk); an output file that cannot
            be written because the disk is full or read-only also stops the run with it.
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
        glob_prompts += read_prompts_file(prompts_file)
    tasks = discover(input_path, glob_prompts or None, limit)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a folder")

    ctx = Dist.start(device)
    lock: FolderLock | None = None
    try:
        # One output folder, one run: rank 0 holds the lock for the whole job; every rank learns the verdict.
        # An existing folder is claimed before the model loads (a second run is refused at once); a new one
        # is created only once the settings are known to be valid.
        lock = FolderLock(out_dir)
        _claim(ctx, lock, out_dir, create=False)
        explainer = _load_explainer(model, pretrained, ctx.device, layer_index)
        input_hw, start, map_hw, weights, config = _configuration(explainer, model, pretrained, size_hw, layer_index,
                                                                  map_spec, dtype, out_dir)
        # The prompts given for every image (JSONL lines may carry their own: those are checked per image).
        run_config = {"config": config, "prompts": clean_prompts(glob_prompts) if glob_prompts else None}
        _claim(ctx, lock, out_dir, create=True)
        _refuse_unless_all_agree(ctx, _record_run_config(ctx, out_dir, run_config, weights, overwrite))
        return _extract(ctx, explainer, tasks, out_dir, config, input_hw, start, map_hw, np.dtype(DTYPES[dtype]),
                        batch_size, workers, progress)
    finally:
        if lock is not None:
            lock.release()
        ctx.close()


def _load_explainer(model: str | Explainer, pretrained: str | None, device: Any, layer_index: int | None) -> Explainer:
    if isinstance(model, Explainer):
        return model
    if isinstance(model, str):
        return Explainer.load(model, pretrained, device, layer_index)
    raise TypeError(f"model must be a model name or an Explainer, got {type(model).__name__}")


def _configuration(explainer: Explainer, model: str | Explainer, pretrained: str | None,
                   size_hw: tuple[int, int] | None, layer_index: int | None, map_spec: Any, dtype: str,
                   out_dir: Path) -> tuple[tuple[int, int], int, tuple[int, int], dict | None, dict[str, Any]]:
    """The run's settings as the model makes them: ``(input_hw, start, map_hw, weights, config)``; ``config`` is
    stored in every output and compared on resume."""
    input_hw = explainer.check_size(size_hw)
    start = explainer.check_layer_index(layer_index) % explainer.wrapper.adapter.depth
    map_hw = (explainer.wrapper.adapter.grid_size(*input_hw) if map_spec == "grid"
              else input_hw if map_spec == "input" else map_spec)
    ready = isinstance(model, Explainer)
    weights = None if ready else weights_identity(pretrained, out_dir)
    config = {
        "format": FORMAT_VERSION,
        "model": explainer.name if ready else model,
        "pretrained": None if ready else pretrained,
        # Replaced weights under the same path are other weights: their outputs are not "done".
        "weights": None if weights is None else {"size": weights["size"], "sha256": weights["sha256"]},
        "layer": start,
        "input_size": list(input_hw),
        "map_size": map_spec if isinstance(map_spec, str) else list(map_spec),
        "dtype": dtype,
    }
    return input_hw, start, map_hw, weights, config


def _record_run_config(ctx: Dist, out_dir: Path, run_config: dict[str, Any], weights: dict | None,
                       overwrite: bool) -> OutputFolderError | None:
    """Rank 0 compares the folder's recorded configuration with this run's and records it; the refusal, if any."""
    if ctx.rank != 0:
        return None
    reason = check_run_config(out_dir, run_config, overwrite)
    if reason is None:
        try:
            write_run_config(out_dir, run_config, weights)
        except OSError as exc:
            reason = f"cannot write into --out {str(out_dir)!r} ({exc.strerror or exc})"
    return None if reason is None else OutputFolderError(reason)


def _claim(ctx: Dist, lock: FolderLock, out_dir: Path, create: bool) -> None:
    """Rank 0 checks that ``out_dir`` is writable and locks it (only if it exists, unless ``create``)."""
    problem = None
    if ctx.rank == 0 and (create or out_dir.is_dir()):
        try:
            prepare_output_folder(out_dir)
            lock.acquire()
        except OutputFolderError as exc:
            problem = exc
    _refuse_unless_all_agree(ctx, problem)


def _refuse_unless_all_agree(ctx: Dist, problem: OutputFolderError | None) -> None:
    """Raises ``problem`` (rank 0's) on every rank if rank 0 found one, so that no rank waits for the others."""
    refused, = ctx.reduce([int(problem is not None)], op="max")
    if problem is not None:
        raise problem
    if refused:
        raise OutputFolderError("rank 0 refused the output folder (see its message)")


def _resume(mine: list[ImageTask], out_dir: Path, config: dict, map_hw: tuple[int, int], dtype: np.dtype,
            workers: int) -> dict[int, list[float]]:
    """The similarities of this rank's images whose output exists and validates (checked in threads: zlib
    releases the GIL), by input position."""
    def check(task: ImageTask) -> list[float] | None:
        return valid_similarities(out_dir, output_name(task.key), task, config, map_hw, dtype)

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 8))) as pool:
        existing = list(pool.map(check, mine))
    return {t.index: sim for t, sim in zip(mine, existing) if sim is not None}


def _extract(ctx: Dist, explainer: Explainer, tasks: list[ImageTask], out_dir: Path, config: dict,
             input_hw: tuple[int, int], start: int, map_hw: tuple[int, int], dtype: np.dtype,
             batch_size: int, workers: int, progress: bool) -> ExtractResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = tasks[ctx.rank::ctx.world]
    done = _resume(mine, out_dir, config, map_hw, dtype, workers)
    todo = [t for t in mine if t.index not in done]

    prompts = PromptTable(explainer, [p for t in tasks for p in t.prompts], {p for t in todo for p in t.prompts})
    device = explainer.device
    # Images for the similarity go in the weights' dtype; integer (quantised) weights take float32.
    param_dtype = explainer.wrapper.adapter.param_dtype()
    model_dtype = param_dtype if param_dtype.is_floating_point else torch.float32

    records: dict[int, dict[str, Any]] = {t.index: record(t, done[t.index], None) for t in mine if t.index in done}
    failures: list[tuple[str, str]] = []

    def finish(task: ImageTask, sim: list[float] | None, error: str | None) -> None:
        records[task.index] = record(task, sim, error)
        if error is not None:
            failures.append((task.image, error))
            logger.warning("failed %s: %s", task.image, error)

    loader = None
    if todo:
        dataset = ImageDataset(todo, LePreprocess(explainer.preprocess, input_hw), explainer.preprocess)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                            collate_fn=collate, pin_memory=device.type == "cuda")
    if ctx.rank == 0:
        _remove_stale_temps(out_dir)  # before the collective below, i.e. before any rank writes
    n_steps, = ctx.reduce([len(loader) if loader is not None else 0], op="max")
    g_skipped, = ctx.reduce([len(done)])

    def explain(batch: dict[str, Any]) -> int:
        for pos, err in batch["errors"]:
            finish(todo[pos], None, err)
        if not batch["pos"]:
            return 0
        return explain_batch(batch, todo, explainer, explainer.wrapper.model, model_dtype, device, prompts, start,
                             map_hw, dtype, out_dir, config, finish)

    t0 = time.perf_counter()
    computed = _steps(ctx, loader, n_steps, explain, progress_bar(len(tasks), "extract", progress and ctx.rank == 0,
                                                                 initial=g_skipped))
    seconds = time.perf_counter() - t0

    _write_shard(out_dir, ctx, records)
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


def _steps(ctx: Dist, loader: DataLoader | None, n_steps: int, explain: Any, bar_context: Any) -> int:
    """Runs this rank's batches in lock-step with the other ranks (``n_steps``: the most batches of any rank);
    returns the images this rank explained."""
    computed = 0
    batches: Iterator[dict[str, Any]] = iter(loader) if loader is not None else iter(())
    with bar_context as bar:
        for _ in range(n_steps):
            batch = next(batches, None)
            finished = 0
            if batch is not None:
                computed += explain(batch)
                finished = len(batch["errors"]) + len(batch["pos"])
            # Lock-step count of finished images: keeps rank 0's bar global with plain collectives.
            g_finished, = ctx.reduce([finished])
            bar.update(g_finished)
    return computed


def _write_shard(out_dir: Path, ctx: Dist, records: dict[int, dict[str, Any]]) -> None:
    """This rank's shard, done images included (the manifest is rebuilt from the outputs on every run), sorted
    by input position so that rank 0 can merge the shards as streams."""
    with write_in_folder(out_dir, _shard_name(ctx.rank, ctx.world)) as fh:
        for index in sorted(records):
            fh.write((json.dumps({"index": index, **records[index]}) + "\n").encode("utf-8"))


# ---------------------------------------------------------------------------------------------- shards
def _shard_name(rank: int, world: int) -> str:
    return f".manifest.rank{rank:05d}-of-{world:05d}.jsonl"


def _remove_stale_temps(out_dir: Path) -> None:
    """Deletes temp files a killed run left behind (``write_in_folder`` names them ``.<name>.<random>.tmp``).

    Walked without following links (``os.walk``'s default; ``Path.glob('**')`` follows them before Python
    3.13): a sub-folder link planted in ``out_dir`` must not lead to deleting files elsewhere.
    """
    top_dir = os.fspath(out_dir)
    for root, _dirs, files in os.walk(top_dir):
        top = root == top_dir
        for name in files:
            if fnmatch.fnmatchcase(name, ".*.npz.*.tmp") or (top and (
                    fnmatch.fnmatchcase(name, f".{MANIFEST_NAME}.*.tmp")
                    or fnmatch.fnmatchcase(name, f".{_SHARD_GLOB}.*.tmp"))):
                path = os.path.join(root, name)
                if not os.path.islink(path):
                    with contextlib.suppress(OSError):
                        os.unlink(path)


def _merge_shards(out_dir: Path, world: int, manifest: Path) -> list[tuple[str, str]]:
    """Merges the ranks' shards (each in input order) into ``manifest`` atomically; returns the failures."""
    names = [_shard_name(r, world) for r in range(world)]
    missing = [str(out_dir / n) for n in names if not is_file_in_folder(out_dir, n)]
    if missing:
        raise RuntimeError(f"manifest shards missing after the barrier: {missing}; is --out on a filesystem "
                           "shared by all nodes?")
    failures: list[tuple[str, str]] = []
    handles = [io.TextIOWrapper(open_in_folder(out_dir, n), encoding="utf-8") for n in names]
    try:
        streams = [(json.loads(line) for line in fh if line.strip()) for fh in handles]
        with write_in_folder(out_dir, manifest.name) as out:
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
