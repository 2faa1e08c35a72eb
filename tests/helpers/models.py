"""Tiny random-init OpenCLIP models (no downloads) and deterministic inputs."""

from __future__ import annotations

import torch

TINY_TEXT = dict(width=32, heads=2, layers=1, context_length=8)

# name -> (open_clip config it shrinks, vision_cfg overrides, extra create_model kwargs)
TINY_VITS = {
    "vit-p8": ("ViT-B-16", dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16), {}),
    "vit-p4-ls": (
        "ViT-B-32",
        dict(image_size=16, patch_size=4, width=48, layers=4, head_width=12, ls_init_value=0.5),
        {"force_quick_gelu": True},
    ),
    # open_clip replaces (does not merge) vision_cfg, so the CLIPA flags are repeated here.
    "clipa-avg": (
        "ViT-L-14-CLIPA",
        dict(image_size=32, patch_size=8, width=64, layers=3, head_width=32, no_ln_pre=True, pool_type="avg",
             final_ln_after_pool=True),
        {},
    ),
    "custom-text": ("ViT-B-16", dict(image_size=24, patch_size=8, width=32, layers=2, head_width=16),
                    {"force_custom_text": True}),
}


def make_tiny_vit(kind: str = "vit-p8", seed: int = 0, embed_dim: int = 32):
    """A tiny random-init open_clip model of the given kind, in eval mode."""
    import open_clip

    name, vision_cfg, extra = TINY_VITS[kind]
    torch.manual_seed(seed)
    model = open_clip.create_model(
        name, pretrained=None, embed_dim=embed_dim, vision_cfg=dict(vision_cfg), text_cfg=dict(TINY_TEXT), **extra
    )
    # Random-init LayerNorms are identities; perturb them so the tests exercise real affine norms.
    with torch.no_grad():
        for mod in model.visual.modules():
            if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
    return model.eval()


def unit_text(p: int, dim: int = 32, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (p, dim) if batch is None else (batch, p, dim)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def rand_image(b: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)
