"""Cost of wrapping (``LeWrapper(model)``, which runs the drift guard) vs one plain forward of the model.

For each model (random init, native size, batch 1) times, in interleaved pairs, (a) the model's own
no-grad forward (open_clip ``encode_image``, a classifier's ``model(x)``, Hugging Face
``get_image_features``) and (b) ``LeWrapper(model)``; prints the medians and the median per-pair ratio
(b)/(a). The issue's bound is 3 plain forwards; ``--no-verify`` times ``LeWrapper(model, verify=False)``
(the wrap without the check).

    python bench/bench_wrap.py --threads 1               # ViT-B-16 open_clip, timm, torchvision, HF CLIP
    python bench/bench_wrap.py --threads 1 --models open_clip --reps 9
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import torch
from common import time_pairs

MODELS = ("open_clip", "timm", "torchvision", "hf_clip")


def build(kind: str, device: str) -> tuple[torch.nn.Module, Callable[[torch.Tensor], object], int]:
    """``(model, plain forward, native size)`` for a random-init ViT-B/16-class model of ``kind``."""
    torch.manual_seed(0)
    if kind == "open_clip":
        import open_clip

        logging.getLogger().setLevel(logging.ERROR)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        return model.to(device).eval(), model.encode_image, 224
    if kind == "timm":
        import timm

        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        return model.to(device).eval(), model, 224
    if kind == "torchvision":
        import torchvision

        model = torchvision.models.vit_b_16(weights=None)
        return model.to(device).eval(), model, 224
    if kind == "hf_clip":
        import transformers

        vision = dict(patch_size=16, image_size=224)  # CLIPConfig's default vision tower is ViT-B/32
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision))
        return model.to(device).eval(), lambda x: model.get_image_features(pixel_values=x), 224
    raise ValueError(f"unknown model kind {kind!r}; choose from {MODELS}")


def time_one(kind: str, reps: int, device: str, verify: bool) -> dict:
    from legrad import LeWrapper

    model, forward, size = build(kind, device)
    image = torch.randn(1, 3, size, size, device=device)

    def plain():
        with torch.no_grad():
            forward(image)

    row = time_pairs(plain, lambda: LeWrapper(model, verify=verify), reps, device)
    return {"model": kind, "forward_s": row["forward_s"], "wrap_s": row["legrad_s"], "ratio": row["ratio"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-verify", action="store_true", help="time LeWrapper(model, verify=False)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{'model':12s} {'forward_s':>10s} {'wrap_s':>10s} {'wrap/forward':>13s}")
    for kind in args.models:
        r = time_one(kind, args.reps, args.device, not args.no_verify)
        print(f"{r['model']:12s} {r['forward_s']:10.4f} {r['wrap_s']:10.4f} {r['ratio']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
