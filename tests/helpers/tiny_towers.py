"""Shrunk random-init copies of every open_clip config (same classes and flags, tiny sizes).

open_clip replaces (does not merge) ``vision_cfg``/``text_cfg`` overrides, so each config's own dicts
are copied and only the sizes changed. open_clip's ``TimmModel`` forwards no size arguments to timm,
so for timm towers ``timm.create_model`` is wrapped while the model is built (``shrunk_timm``) to add
``embed_dim``/``depth``/``num_heads``/``img_size``; two stems have their channels fixed inside their
timm entry points (ViTamin's MbConv stages, MobileCLIP-B's ConvStem), so their builders are wrapped
too, keeping the stem's layout (strides, kernels, norms, activations) and shrinking only widths.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types

import open_clip
import torch
from torch import nn

TEXT = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
WIDTH = 32  # image tower width
DEPTH = 3
TRUNK_GRID = 3  # timm trunks are built for a 3x3 patch grid; tests use other grids


@contextlib.contextmanager
def shrunk_timm(img_size: int, **extra):
    """While active, timm models built by open_clip are tiny (see module docstring)."""
    import open_clip.timm_model as otm
    import timm
    import timm.models.vision_transformer_hybrid as hybrid_mod
    import timm.models.vitamin as vitamin_mod
    from timm.models import model_entrypoint

    create, make_vitamin, make_hybrid = timm.create_model, vitamin_mod._create_vitamin, \
        hybrid_mod._create_vision_transformer_hybrid

    def create_model(name, **kw):
        kw.update(embed_dim=WIDTH, depth=DEPTH, num_heads=2, img_size=img_size)
        module = model_entrypoint(name).__module__
        if module.endswith(".eva"):
            kw["attn_pool_num_heads"] = 4
        if module.endswith(".vision_transformer_relpos"):
            kw["rel_pos_dim"] = 16
        kw.update(extra)
        return create(name, **kw)

    def vitamin(variant, pretrained=False, embed_cfg=None, **kw):
        embed_cfg = dataclasses.replace(embed_cfg, embed_dim=(8, 16, kw["embed_dim"]), depths=(1, 1, 1), stem_width=8)
        return make_vitamin(variant, pretrained=pretrained, embed_cfg=embed_cfg, **kw)

    def hybrid(variant, backbone, embed_args=None, pretrained=False, **kw):
        convs = [layer.conv for layer in backbone]
        backbone = hybrid_mod.ConvStem(
            channels=tuple([8] * (len(convs) - 1) + [kw["embed_dim"]]),
            stride=tuple(c.stride[0] for c in convs),
            kernel_size=tuple(c.kernel_size[0] for c in convs),
            padding=0,
            act_layer=type(backbone[0].bn.act),
        )
        return make_hybrid(variant, backbone, embed_args=embed_args, pretrained=pretrained, **kw)

    saved = otm.timm
    otm.timm = types.SimpleNamespace(create_model=create_model)
    vitamin_mod._create_vitamin = vitamin
    hybrid_mod._create_vision_transformer_hybrid = hybrid
    try:
        yield
    finally:
        otm.timm = saved
        vitamin_mod._create_vitamin = make_vitamin
        hybrid_mod._create_vision_transformer_hybrid = make_hybrid


def _tiny_text_cfgs(cfg: dict) -> dict:
    text = {k: v for k, v in cfg["text_cfg"].items() if not k.startswith("hf_") and k != "tokenizer_kwargs"}
    text.update(TEXT)
    out = {"text_cfg": text}
    if "multimodal_cfg" in cfg:
        mm = dict(cfg["multimodal_cfg"])
        mm.update(TEXT, attn_pooler_heads=2)
        out["multimodal_cfg"] = mm
    return out


def timm_patch(name: str) -> int:
    """Total stride of a timm trunk's patch embedding, from the model's entry point (meta device)."""
    import timm

    with torch.device("meta"):
        t = timm.create_model(name, pretrained=False, depth=1)
    pe = t.patch_embed
    r = pe.feat_ratio(as_scalar=True) if hasattr(pe, "feat_ratio") else pe.patch_size[0]
    return int(r)


def build_tiny(name: str, seed: int = 0, embed_dim: int = WIDTH, timm_extra: dict | None = None,
               vision_extra: dict | None = None) -> nn.Module:
    """Tiny random-init copy of the open_clip config ``name`` in eval mode, with perturbed constants."""
    cfg = open_clip.get_model_config(name)
    vision = copy.deepcopy(cfg["vision_cfg"])
    kw = _tiny_text_cfgs(cfg)
    torch.manual_seed(seed)
    if vision.get("timm_model_name"):
        patch = timm_patch(vision["timm_model_name"])
        # like ViTamin-XL-384 (config 256, trunk 384): open_clip's image_size differs from the trunk's
        vision["image_size"] = 2 * patch
        vision.update(vision_extra or {})
        with shrunk_timm(TRUNK_GRID * patch, **(timm_extra or {})):
            model = open_clip.create_model(name, pretrained=None, embed_dim=embed_dim, vision_cfg=vision, **kw)
    else:
        if isinstance(vision.get("layers"), (list, tuple)):
            raise ValueError(f"{name} has a ResNet tower; build it with build_meta")
        vision.update(image_size=24, patch_size=8, width=WIDTH, layers=DEPTH, head_width=16)
        if vision.get("attentional_pool"):
            vision["attn_pooler_heads"] = 2
        vision.update(vision_extra or {})
        model = open_clip.create_model(name, pretrained=None, embed_dim=embed_dim, vision_cfg=vision, **kw)
    _init_left_empty(model)
    _perturb(model.visual)
    bad = [n for n, t in model.named_parameters() if not bool(torch.isfinite(t).all())]
    if bad:  # uninitialised memory would make the tests flaky: fail loudly instead
        raise RuntimeError(f"{name}: tiny model holds non-finite values in {bad}")
    return model.eval()


@torch.no_grad()
def _init_left_empty(model: nn.Module) -> None:
    """open_clip 3.3 builds CoCa's decoder ``text_projection`` with ``torch.empty`` and never calls the
    decoder's ``init_parameters``: that memory is uninitialised (sometimes NaN). Initialise it from the
    seeded generator so that no test depends on it."""
    from open_clip.transformer import MultimodalTransformer

    for m in model.modules():
        if isinstance(m, MultimodalTransformer) and m.text_projection is not None:
            nn.init.normal_(m.text_projection, std=m.text_projection.shape[0] ** -0.5)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-aware: a NaN equals the same NaN bits; -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                       b.detach().reshape(-1).contiguous().view(torch.uint8))


def build_meta(name: str) -> nn.Module:
    """Full-size model on the meta device (no memory, no weights): enough to check the tower's type."""
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta", **_tiny_text_cfgs(
            open_clip.get_model_config(name)))


@torch.no_grad()
def _perturb(visual: nn.Module) -> None:
    """Random init leaves many parameters constant (zero biases, unit norms, 1e-5 layer scales) and
    BatchNorm statistics trivial; perturb them so the tests exercise every term."""
    for p in visual.parameters():
        if p.numel() and bool((p == p.flatten()[0]).all()):
            p.add_(0.1 * torch.randn_like(p))
    for m in visual.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)


def random_text(p: int, dim: int, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (p, dim) if batch is None else (batch, p, dim)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)


def random_image(b: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)
