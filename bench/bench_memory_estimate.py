"""The pre-flight memory estimate (``legrad.engine.budget.estimate_call_bytes``) against measured peaks.

For each (family, size, P) config, a fresh subprocess builds a random-init model of the family, runs one
tiny warm-up call (2x2 patches: torch's one-time initialisation is not the call's memory), then one
``compute_legrad`` call, and reports the call's extra peak memory (``common.peak_extra_bytes``: peak RSS
above the RSS before the call on CPU, the allocator's peak on CUDA) next to the estimate the engine
computed for that very call (its ``check_call`` arguments, recorded). The estimate must be an upper
bound (ratio estimate / measured >= 1) without being absurdly loose.

Families: ``demo`` (the bundled open_clip ViT, patch 8, explained from its recommended block),
``openclip-s16`` (open_clip ViT-S-16), ``hf-clip`` (a transformers CLIP, width 256), ``hf-siglip``
(a transformers SigLIP: attention pooler and the empty-prompt correction), ``timm-vit`` (a timm
``vit_tiny_patch16_224`` classifier explaining class targets).

    python bench/bench_memory_estimate.py --threads 1
    python bench/bench_memory_estimate.py --threads 1 --families demo --sizes 512 --prompts 16
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

import torch
from common import peak_extra_bytes

FAMILIES = ("demo", "openclip-s16", "hf-clip", "hf-siglip", "timm-vit")
DEFAULT_SIZES = {"demo": [224, 512, 768], "openclip-s16": [224, 512], "hf-clip": [224, 512],
                 "hf-siglip": [224, 512], "timm-vit": [224, 512]}


def build(family: str, size: int, device: str) -> tuple[torch.nn.Module, object]:
    """``(model, wrapper)``: a random-init model of ``family`` built for ``size`` px, and its ``LeWrapper``."""
    from legrad import LeWrapper

    logging.getLogger().setLevel(logging.ERROR)
    torch.manual_seed(0)
    if family == "demo":
        from legrad.toy import LAYER_INDEX, load_model

        model = load_model()[0]
        return model.to(device).eval(), LeWrapper(model, layer_index=LAYER_INDEX, max_tokens=None)
    if family == "openclip-s16":
        import open_clip

        model = open_clip.create_model("ViT-S-16", pretrained=None, force_image_size=size).to(device).eval()
        return model, LeWrapper(model, max_tokens=None)
    if family in ("hf-clip", "hf-siglip"):
        import transformers as T

        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4,
                      image_size=size, patch_size=16)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                    vocab_size=64, max_position_embeddings=16)
        if family == "hf-clip":
            model = T.CLIPModel(T.CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
            return model.to(device).eval(), LeWrapper(model, max_tokens=None)
        model = T.SiglipModel(T.SiglipConfig(text_config=text, vision_config=vision)).to(device).eval()
        empty = torch.nn.functional.normalize(torch.randn(256), dim=0).to(device)
        return model, LeWrapper(model, max_tokens=None, empty_text_embedding=empty)
    if family == "timm-vit":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=size).to(device).eval()
        return model, LeWrapper(model, max_tokens=None)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def _child(family: str, size: int, p: int, device: str) -> None:
    from legrad.engine import budget, pipeline

    _, wrapper = build(family, size, device)
    seen: dict = {}
    original = pipeline.check_call

    def recording_check_call(**kw):
        seen.update(kw)
        return original(**kw)

    pipeline.check_call = recording_check_call
    ph, pw = wrapper.adapter.patch_size
    image = torch.randn(1, 3, size, size, device=device)
    from legrad.engine.targets import Logits

    if isinstance(wrapper.adapter.readout_space, Logits):
        prompts = {"target": torch.arange(p, device=device)}
        tiny = {"target": torch.arange(1, device=device)}
    else:
        text = torch.nn.functional.normalize(torch.randn(p, wrapper.adapter.embed_dim, device=device), dim=-1)
        prompts, tiny = {"text_embedding": text}, {"text_embedding": text[:1]}
    wrapper.compute_legrad(image=torch.randn(1, 3, 2 * ph, 2 * pw, device=device), **tiny)
    extra = peak_extra_bytes(lambda: wrapper.compute_legrad(image=image, **prompts), device)
    args = {k: seen[k] for k in ("batch", "tokens", "width", "prompts", "out_pixels", "element_size")}
    print(json.dumps({"extra_bytes": extra, "estimate_bytes": budget.estimate_call_bytes(**args), **args}))


def measure(family: str, size: int, p: int, device: str = "cpu", threads: int = 1) -> dict:
    """``{"extra_bytes", "estimate_bytes", ...}`` of one call, measured in a fresh subprocess."""
    out = subprocess.run([sys.executable, __file__, "--_child", family, str(size), str(p), device,
                          "--threads", str(threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default: per family")
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._child:
        family, size, p, device = args._child
        _child(family, int(size), int(p), device)
        return
    print(f"threads={args.threads} device={args.device} torch={torch.__version__}")
    print("| family | size | tokens | P | measured extra peak (MiB) | estimate (MiB) | estimate / measured |")
    print("|---|---|---|---|---|---|---|")
    for family in args.families:
        for size in args.sizes or DEFAULT_SIZES[family]:
            for p in args.prompts:
                r = measure(family, size, p, args.device, args.threads)
                m, e = r["extra_bytes"] / 2**20, r["estimate_bytes"] / 2**20
                print(f"| {family} | {size} | {r['tokens']} | {p} | {m:.0f} | {e:.0f} | {e / max(m, 1e-9):.2f} |",
                      flush=True)


if __name__ == "__main__":
    main()
