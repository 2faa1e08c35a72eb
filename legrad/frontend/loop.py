"""The one folder loop of ``legrad explain`` (prompts, class targets, VLM answers) and the pieces of it that
``legrad extract`` shares: finding the images of a folder (:func:`legrad.io.images.find_images`), one image's
failure costing only that image (:func:`explain_isolated`), and the progress bar (:func:`progress_bar`).

:func:`run_folder` reads each batch's images, explains them isolated and hands every result to the caller's
writer, with one line on stderr per skipped or failed image. ``legrad extract`` decodes in
DataLoader workers and steps all ``torchrun`` ranks in lock-step, so it drives its own batches through
:func:`explain_isolated` and :func:`progress_bar` (``legrad.extract.runner``).
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..io.errors import ImageLoadError, one_line

__all__ = ["LoopResult", "describe_failure", "explain_isolated", "is_memory_error", "progress_bar", "release_memory",
           "run_folder"]

T = TypeVar("T")
R = TypeVar("R")


def is_memory_error(exc: BaseException) -> bool:
    """Whether an exception says that memory ran out (host or accelerator)."""
    oom = getattr(torch, "OutOfMemoryError", ())
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or bool(oom and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError)
        and any(s in text for s in ("out of memory", "not enough memory", "can't allocate")))


def describe_failure(exc: BaseException, limit: int = 200) -> str:
    """One line for a failed image: the message, marked as out of memory when it was."""
    text = one_line(exc, limit)
    return f"out of memory ({text})" if is_memory_error(exc) and "memory" not in text.lower() else text


def release_memory(exc: BaseException) -> None:
    """After an out-of-memory error, hands cached blocks back so that smaller retries can fit."""
    if is_memory_error(exc):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def explain_isolated(units: Sequence[T], explain: Callable[[list[T]], Sequence[R]],
                     describe: Callable[[BaseException], str] = describe_failure) -> list[tuple[R | None, str | None]]:
    """Explains a batch; if that fails, each unit alone, so that one bad image costs only itself.

    Any ``Exception`` counts as the images' problem (a degenerate image may overflow a size computation as
    well as run out of memory); ``KeyboardInterrupt`` and ``SystemExit`` still stop the run.

    Args:
        units: the batch (images, or positions in a decoded batch).
        explain: units -> one result per unit, in order.
        describe: the message of a unit that failed alone.

    Returns:
        ``(result, None)`` or ``(None, message)`` per unit, in order.
    """
    try:
        results = explain(list(units))
    except Exception as exc:
        release_memory(exc)
        if len(units) == 1:
            return [(None, describe(exc))]
        del exc  # its traceback holds the failed batch's tensors
        return [r for unit in units for r in explain_isolated([unit], explain, describe)]
    return [(r, None) for r in results]


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True, initial: int = 0) -> Iterator[Any]:
    """A progress bar on stderr that log lines do not break (tqdm; ``enabled=False``: a silent stand-in)."""
    bar = tqdm(total=total, initial=initial, unit="img", desc=desc, file=sys.stderr, disable=not enabled,
               dynamic_ncols=True)
    with bar, (logging_redirect_tqdm() if enabled else contextlib.nullcontext()):
        yield bar


@dataclass
class LoopResult:
    """What :func:`run_folder` did: ``ok`` images written, ``failed`` images skipped or failed."""

    ok: int = 0
    failed: int = 0


def run_folder(items: Sequence[T], *, load: Callable[[T], Any], explain: Callable[[list[Any]], Sequence[R]],
               write: Callable[[T, Any, R], None], prefix: str, batch_size: int = 1,
               progress: bool = True, desc: str = "explain", source: Callable[[T], str] = str,
               after_batch: Callable[[], None] | None = None) -> LoopResult:
    """Explains every item in batches: read, explain isolated, write; one image's failure costs only itself.

    Args:
        items: the images to explain (e.g. from :func:`legrad.io.images.find_images`).
        load: item -> image (an ``ImageLoadError`` is reported as is, anything else with the item's source).
        explain: a batch of loaded images -> one result per image (see :func:`explain_isolated`).
        write: stores one image's result (``item, image, result``); what it raises fails that image only.
        prefix: starts each line on stderr about a skipped or failed image (e.g. ``'legrad explain'``).
        batch_size: images per call of ``explain``.
        progress: draw a progress bar on stderr.
        desc: the bar's label.
        source: how reports name an item.
        after_batch: called after every batch (e.g. to flush a scores file), also when the loop is
            interrupted.

    Returns:
        A :class:`LoopResult`.
    """
    result = LoopResult()
    with progress_bar(len(items), desc, progress) as bar:

        def report(line: str) -> None:
            bar.write(f"{prefix}: {line}", file=sys.stderr)

        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start:start + batch_size]
                loaded = []
                for item in chunk:
                    try:
                        loaded.append((item, load(item)))
                    except Exception as exc:  # any failure of one image costs only that image
                        report(f"skipped {exc}" if isinstance(exc, ImageLoadError)
                               else f"skipped {source(item)}: {describe_failure(exc)}")
                        result.failed += 1
                outcomes = explain_isolated([im for _, im in loaded], explain) if loaded else []
                for (item, image), (value, err) in zip(loaded, outcomes):
                    if err is not None:
                        report(f"failed {source(item)}: {err}")
                        result.failed += 1
                        continue
                    try:
                        write(item, image, value)
                        result.ok += 1
                    except Exception as exc:
                        report(f"failed to write outputs for {source(item)}: {describe_failure(exc)}")
                        result.failed += 1
                if after_batch is not None:
                    after_batch()  # after every batch, so that a killed run keeps what it finished
                bar.update(len(chunk))
        finally:
            if after_batch is not None:
                after_batch()  # also on Ctrl-C and SIGTERM
    return result
