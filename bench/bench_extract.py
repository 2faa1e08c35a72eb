"""Throughput of ``legrad extract`` with 1 and 2 processes (torchrun, gloo on CPU; NCCL per GPU on CUDA).

Generates synthetic scenes, then runs ``legrad extract`` on them once per process count, each run in a
fresh output folder, and prints images/s of the extraction loop (model loading and interpreter start-up
excluded: what matters on a large dataset) and end to end. On CPU, every configuration gets the same
number of cores in total (``OMP_NUM_THREADS`` = cores // processes, or ``--threads``), so the
comparison is about parallelism, not oversubscription. With CUDA, it also runs one process per GPU (1..N GPUs) and prints
images/s per GPU.

    python bench/bench_extract.py                         # 64 scenes, demo model, 1 and 2 processes
    python bench/bench_extract.py --images 256 --size 128 --prompts 16 --procs 1 2 4
    python bench/bench_extract.py --model ViT-B-16 --pretrained none --size 224 --device cuda

Without the bundled demo checkpoint (not yet committed), a random-init one of the same architecture is
used: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _toy_pretrained(tmp: Path) -> str | None:
    """None for the bundled demo checkpoint, else the path of a random-init one."""
    from legrad.toy import CHECKPOINT_PATH

    if Path(CHECKPOINT_PATH).is_file():
        return None
    import torch

    from legrad.toy.model import ToyConfig, build_model, known_token_ids, make_tokenizer, save_checkpoint

    cfg = ToyConfig()
    torch.manual_seed(0)
    path = tmp / "toy_random.pt"
    save_checkpoint(build_model(cfg), cfg, path, known_token_ids(make_tokenizer(cfg)))
    return str(path)


def _make_images(folder: Path, n: int) -> list[str]:
    """Writes ``n`` scenes; returns the demo vocabulary (the candidate prompts)."""
    from legrad.toy import VOCABULARY, make_scenes

    folder.mkdir(parents=True)
    for i, scene in enumerate(make_scenes(n, seed=0)):
        scene.image.save(folder / f"scene{i:05d}.png")
    return list(VOCABULARY)


def _run(procs: int, threads: int, args: argparse.Namespace, images: Path, out: Path, prompts: list[str],
         pretrained: str | None, device: str) -> tuple[float, float]:
    """One extraction; returns (loop images/s, end-to-end images/s)."""
    cmd = [sys.executable, "-m", "legrad", "extract"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
        "-m", "legrad", "extract"]
    cmd += [str(images), "--out", str(out), "--model", args.model, "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--device", device, "-q"]
    if pretrained:
        cmd += ["--pretrained", pretrained]
    if args.size:
        cmd += ["--size", str(args.size)]
    for p in prompts:
        cmd += ["-p", p]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    m = re.search(r"([\d.]+) images/s", proc.stdout)
    if proc.returncode != 0 or m is None:
        sys.exit(f"run with {procs} process(es) failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    return float(m.group(1)), args.images / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64, help="number of generated 64x64 scenes (default 64)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per image (default 8)")
    ap.add_argument("--size", type=int, default=None, help="explained size (default: the model's native size)")
    ap.add_argument("--model", default="toy")
    ap.add_argument("--pretrained", default=None, help="for OpenCLIP models, e.g. 'none' (random init, offline)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers per process (default 1)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="CPU process counts (default 1 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process (default: cores // processes); 1 on a busy shared machine")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: CPU runs, plus per-GPU runs when CUDA is available")
    args = ap.parse_args()

    import torch

    cores = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if args.device in ("auto", "cuda") and torch.cuda.is_available() else 0
    if args.device == "cuda" and not gpus:
        sys.exit("--device cuda: no CUDA GPU available")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        pretrained = _toy_pretrained(tmp) if args.model == "toy" and args.pretrained is None else args.pretrained
        vocab = _make_images(tmp / "images", args.images)
        prompts = vocab[: args.prompts]
        label = args.model + ("" if pretrained is None or args.model != "toy" else " (random-init demo architecture)")
        print(f"legrad extract throughput: {args.images} images, {len(prompts)} prompts, model {label}, "
              f"size {args.size or 'native'}, batch {args.batch_size}, {args.workers} worker(s)/process, "
              f"{cores} CPU cores, torch {torch.__version__}")
        print("\n| device | processes | threads/process | loop images/s | end-to-end images/s | per device |")
        print("|---|---|---|---|---|---|")
        if args.device != "cuda":
            for n in args.procs:
                threads = args.threads or max(1, cores // n)
                loop, e2e = _run(n, threads, args, tmp / "images", tmp / f"cpu{n}", prompts, pretrained, "cpu")
                print(f"| cpu | {n} | {threads} | {loop:.2f} | {e2e:.2f} | - |", flush=True)
        for n in range(1, gpus + 1):
            threads = args.threads or max(1, cores // n)
            loop, e2e = _run(n, threads, args, tmp / "images", tmp / f"gpu{n}", prompts, pretrained, "cuda")
            print(f"| cuda | {n} | {threads} | {loop:.2f} | {e2e:.2f} | {loop / n:.2f} /GPU |", flush=True)
        if not gpus:
            print("\n(no CUDA GPU here: per-GPU rows skipped)")


if __name__ == "__main__":
    main()
