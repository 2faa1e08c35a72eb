"""Timing and memory helpers shared by the bench scripts (``bench_prompts.py``, ``bench_resolution.py``).

The scripts import this as ``common`` (Python puts a script's own folder first on ``sys.path``).
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    """Waits for queued CUDA work, so that a wall-clock reading covers it (no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn`` in seconds (no warm-up)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_rounds(fns: dict[str, Callable[[], object]], reps: int, device: str) -> dict[str, list[float]]:
    """Times every call once per round, ``reps`` rounds after one warm-up round (drifts of machine load hit every
    call of a round alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(reps, 1)):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def time_pairs(plain: Callable[[], object], explain: Callable[[], object], reps: int, device: str) -> dict:
    """Times ``plain`` and ``explain`` in ``reps`` interleaved pairs, after one warm-up pair.

    Each ratio compares calls made moments apart, which cancels slow drifts of machine load; the
    median over pairs discards bursts.

    Returns:
        ``{"forward_s", "legrad_s", "ratio"}``: medians of the plain times, the explain times and the
        per-pair ratios explain/plain.
    """
    plain(), explain()  # warm-up (also fills caches such as resampled positional embeddings)
    base, lg, ratios = [], [], []
    for _ in range(max(reps, 1)):
        b, t = timed(plain, device), timed(explain, device)
        base.append(b)
        lg.append(t)
        ratios.append(t / b)
    return {"forward_s": statistics.median(base), "legrad_s": statistics.median(lg),
            "ratio": statistics.median(ratios)}


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(call: Callable[[], object], device: str) -> int:
    """Peak memory of one ``call`` above what is in use before it, in bytes.

    On CUDA the allocator's peak; on CPU the peak resident memory: writing 5 to ``/proc/self/clear_refs``
    resets the kernel's peak-RSS counter (``VmHWM``) to the current RSS, so the peak is the call's own,
    not model construction's.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    gc.collect()
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    call()
    return (status_kib("VmHWM") - base) * 1024


def report_extra_bytes(extra: int) -> None:
    """The memory child's answer to its parent (the last line of its stdout)."""
    print(json.dumps({"extra_bytes": extra}))


def child_extra_mib(cmd: list[str]) -> float:
    """Runs a memory child process and returns its :func:`report_extra_bytes` answer in MiB."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"] / 2**20


def time_prompt_counts(model, wrapper, image: torch.Tensor, prompts: list[int], reps: int, device: str) -> list[dict]:
    """``time_pairs`` of one ``compute_legrad`` call against a no-grad ``encode_image``, for each prompt count.

    Returns:
        One dict per count: ``{"P": count, **time_pairs(...)}`` (random unit text embeddings).
    """
    dim = wrapper.adapter.embed_dim

    def plain():
        with torch.no_grad():
            model.encode_image(image)

    rows = []
    for p in prompts:
        text = torch.nn.functional.normalize(torch.randn(p, dim, device=device), dim=-1)

        def explain(text=text):
            wrapper.compute_legrad(text, image=image)

        rows.append({"P": p, **time_pairs(plain, explain, reps, device)})
    return rows
