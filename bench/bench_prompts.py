"""Cost of LeGrad vs a plain forward pass, as a function of the number of prompts.

For each image size, builds a random-init model at that size (open_clip's ``force_image_size``) and
times, in the same process, (a) one no-grad ``encode_image`` of the batch and (b) one
``compute_legrad`` call with P prompts. Prints medians and the ratio (b)/(a). Extra peak memory of
each call above the loaded model is measured in a fresh subprocess (max RSS on CPU, CUDA allocator
peak on GPU).

    python bench/bench_prompts.py                       # ViT-B-16, 224 and 448 px, P = 1 8 32 80
    python bench/bench_prompts.py --threads 1 --sizes 224 --prompts 1 8 32
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import time

import torch


def _build(model_name: str, size: int, device: str):
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    model = open_clip.create_model(model_name, pretrained=None, force_image_size=size).to(device).eval()
    return model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, reps: int, device: str) -> float:
    """Median wall time of ``reps`` calls (one call, no warm-up, when ``reps`` is 0)."""
    if reps:
        fn()
    times = []
    for _ in range(max(reps, 1)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_one(model_name: str, size: int, prompts: list[int], reps: int, batch: int, device: str) -> list[dict]:
    from legrad import LeWrapper

    torch.manual_seed(0)
    model = _build(model_name, size, device)
    wrapper = LeWrapper(model)
    image = torch.randn(batch, 3, size, size, device=device)
    dim = wrapper.adapter.embed_dim

    def plain():
        with torch.no_grad():
            model.encode_image(image)

    rows = []
    for p in prompts:
        text = torch.nn.functional.normalize(torch.randn(p, dim, device=device), dim=-1)

        def explain(text=text):
            wrapper.compute_legrad(text, image=image)

        plain(), explain()  # warm-up (also fills the positional-embedding cache)
        # Interleaved pairs: each ratio compares calls made moments apart, which cancels slow drifts
        # of machine load; the median over pairs discards bursts.
        base_t, legrad_t, ratios = [], [], []
        for _ in range(reps):
            b = _median_time(plain, 0, device)
            t = _median_time(explain, 0, device)
            base_t.append(b)
            legrad_t.append(t)
            ratios.append(t / b)
        rows.append({"size": size, "P": p, "forward_s": statistics.median(base_t),
                     "legrad_s": statistics.median(legrad_t), "ratio": statistics.median(ratios)})
    return rows


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(model_name: str, size: int, p: int, batch: int, device: str) -> None:
    from legrad import LeWrapper

    torch.manual_seed(0)
    model = _build(model_name, size, device)
    wrapper = LeWrapper(model)
    image = torch.randn(batch, 3, size, size, device=device)
    text = torch.nn.functional.normalize(torch.randn(p, wrapper.adapter.embed_dim, device=device), dim=-1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        wrapper.compute_legrad(text, image=image)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        import gc

        gc.collect()
        base = _status_kib("VmRSS")
        # Writing 5 to clear_refs resets the kernel's peak-RSS counter (VmHWM) to the current RSS,
        # so the peak below is the call's own, not model construction's.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        wrapper.compute_legrad(text, image=image)
        extra = (_status_kib("VmHWM") - base) * 1024
    print(json.dumps({"extra_bytes": extra}))


def memory_one(model_name: str, size: int, p: int, batch: int, device: str, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--_memory-child", model_name, str(size), str(p), str(batch), device,
         "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"] / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 8, 32, 80])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--_memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        name, size, p, batch, device = args._memory_child
        _memory_child(name, int(size), int(p), int(batch), device)
        return

    print(f"model={args.model} batch={args.batch} threads={torch.get_num_threads()} device={args.device} "
          f"torch={torch.__version__}")
    print("| size | P | plain forward (s, median) | LeGrad (s, median) | ratio (median of pairs) | extra peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for row in time_one(args.model, size, args.prompts, args.reps, args.batch, args.device):
            mem = "-" if args.no_memory else f"{memory_one(args.model, size, row['P'], args.batch, args.device, torch.get_num_threads()):.0f}"
            print(f"| {size} | {row['P']} | {row['forward_s']:.3f} | {row['legrad_s']:.3f} | "
                  f"{row['ratio']:.2f}x | {mem} |", flush=True)


if __name__ == "__main__":
    main()
