"""Cost of LeGrad across input resolutions: time ratio vs a plain forward and extra peak memory.

Two models: a random-init ViT-B-16 built at each size (open_clip's ``force_image_size``, no weights
downloaded) and the bundled demo model (``legrad.toy.load_model()``, patch 8, positions resampled to the
size). For each (model, size, P) config:

* *ratio*: one ``compute_legrad`` call divided by one no-grad ``encode_image`` of the same batch, in
  interleaved pairs in one process (median over ``--reps`` pairs, after one warm-up pair);
* *extra peak memory*: the call's peak resident memory above the loaded model, measured in a fresh
  subprocess per config, after one tiny warm-up call (2x2 patches) so that torch's one-time kernel and
  library initialisation is not counted (the kernel's peak-RSS counter ``VmHWM`` is reset through
  ``/proc/self/clear_refs`` right before the call; on CUDA the allocator's peak).

    python bench/bench_resolution.py --threads 1                          # the default grid
    python bench/bench_resolution.py --threads 1 --models demo --sizes 512 --prompts 4 --no-time
"""

from __future__ import annotations

import argparse
import logging
import sys

import torch
from common import child_extra_mib, peak_extra_bytes, report_extra_bytes, time_prompt_counts

DEFAULT_SIZES = {"vit-b-16": [224, 448, 768, 1024], "demo": [224, 512, 768, 1024]}


def _build(model_name: str, size: int, device: str):
    """``(model, wrapper)`` for ``model_name`` at ``size`` px."""
    from legrad import LeWrapper

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    if model_name == "demo":
        from legrad.ops.posembed import resample_grid_embedding
        from legrad.toy import LAYER_INDEX, load_model

        model = load_model()[0].to(device).eval()
        # open_clip's encode_image only runs at the trained grid: give the model its positions resampled
        # to this size (what LeGrad does on the fly), so that the plain forward exists at every size.
        v = model.visual
        grid = (size // v.patch_size[0], size // v.patch_size[1])
        with torch.no_grad():
            pos = resample_grid_embedding(v.positional_embedding.detach(), tuple(v.grid_size), grid, 1)
        v.positional_embedding = torch.nn.Parameter(pos.to(v.positional_embedding.dtype))
        v.grid_size = grid
        # Explaining above the native size: allow the largest grids of the table.
        return model, LeWrapper(model, layer_index=LAYER_INDEX, max_tokens=None)
    import open_clip

    name = {"vit-b-16": "ViT-B-16"}.get(model_name, model_name)
    model = open_clip.create_model(name, pretrained=None, force_image_size=size).to(device).eval()
    return model, LeWrapper(model, max_tokens=None)


def time_config(model_name: str, size: int, prompts: list[int], reps: int, device: str) -> list[dict]:
    model, wrapper = _build(model_name, size, device)
    image = torch.randn(1, 3, size, size, device=device)
    return [{"model": model_name, "size": size, **row}
            for row in time_prompt_counts(model, wrapper, image, prompts, reps, device)]


def _memory_child(model_name: str, size: int, p: int, device: str) -> None:
    model, wrapper = _build(model_name, size, device)
    image = torch.randn(1, 3, size, size, device=device)
    text = torch.nn.functional.normalize(torch.randn(p, wrapper.adapter.embed_dim, device=device), dim=-1)
    # One tiny call first (one patch grid of 2x2): torch's one-time kernel/library initialisation is not
    # the call's memory.
    ph, pw = wrapper.adapter.patch_size
    wrapper.compute_legrad(text[:1], image=torch.randn(1, 3, 2 * ph, 2 * pw, device=device))
    report_extra_bytes(peak_extra_bytes(lambda: wrapper.compute_legrad(text, image=image), device))


def memory_config(model_name: str, size: int, p: int, device: str, threads: int) -> float:
    """Extra peak MiB of one call, in a fresh subprocess."""
    return child_extra_mib([sys.executable, __file__, "--_memory-child", model_name, str(size), str(p), device,
                            "--threads", str(threads)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit-b-16", "demo"], help="vit-b-16, demo or an open_clip name")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default: per model, 224 to 1024 px")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--reps", type=int, default=3, help="timed pairs per config (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-time", action="store_true", help="skip the timings")
    parser.add_argument("--_memory-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        name, size, p, device = args._memory_child
        _memory_child(name, int(size), int(p), device)
        return
    print(f"threads={torch.get_num_threads()} device={args.device} torch={torch.__version__} reps={args.reps}")
    print("| model | size | tokens | P | plain forward (s) | LeGrad (s) | ratio | extra peak memory (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models:
        patch = 8 if model_name == "demo" else 16
        for size in args.sizes or DEFAULT_SIZES.get(model_name, [224, 448]):
            if args.no_time:
                rows = [{"model": model_name, "size": size, "P": p} for p in args.prompts]
            else:
                rows = time_config(model_name, size, args.prompts, args.reps, args.device)
            for row in rows:
                mem = "-" if args.no_memory else \
                    f"{memory_config(model_name, size, row['P'], args.device, torch.get_num_threads()):.0f}"
                timing = ("- | - | -" if args.no_time else
                          f"{row['forward_s']:.3f} | {row['legrad_s']:.3f} | {row['ratio']:.2f}x")
                print(f"| {model_name} | {size} | {(size // patch) ** 2 + 1} | {row['P']} | {timing} | {mem} |",
                      flush=True)


if __name__ == "__main__":
    main()
