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
import logging
import sys

import torch
from common import child_extra_mib, peak_extra_bytes, report_extra_bytes, time_prompt_counts


def _build(model_name: str, size: int, device: str):
    import open_clip

    logging.getLogger().setLevel(logging.ERROR)
    model = open_clip.create_model(model_name, pretrained=None, force_image_size=size).to(device).eval()
    return model


def time_one(model_name: str, size: int, prompts: list[int], reps: int, batch: int, device: str) -> list[dict]:
    from legrad import LeWrapper

    torch.manual_seed(0)
    model = _build(model_name, size, device)
    wrapper = LeWrapper(model)
    image = torch.randn(batch, 3, size, size, device=device)
    return [{"size": size, **row} for row in time_prompt_counts(model, wrapper, image, prompts, reps, device)]


def _memory_child(model_name: str, size: int, p: int, batch: int, device: str) -> None:
    from legrad import LeWrapper

    torch.manual_seed(0)
    model = _build(model_name, size, device)
    wrapper = LeWrapper(model)
    image = torch.randn(batch, 3, size, size, device=device)
    text = torch.nn.functional.normalize(torch.randn(p, wrapper.adapter.embed_dim, device=device), dim=-1)
    report_extra_bytes(peak_extra_bytes(lambda: wrapper.compute_legrad(text, image=image), device))


def memory_one(model_name: str, size: int, p: int, batch: int, device: str, threads: int) -> float:
    return child_extra_mib([sys.executable, __file__, "--_memory-child", model_name, str(size), str(p), str(batch),
                            device, "--threads", str(threads)])


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
