"""Baselines on ViT image classifiers (``target=`` class indices) against slow explicit oracles written here.

Each oracle runs one image through a deep copy of a tiny random-init timm or torchvision classifier
(float64) block by block from the model's own modules, with every block's post-softmax attention
``A_l = softmax(q k^T * scale)`` written out and kept in the autograd graph, the model's own head on
the last tokens (``forward_head`` / ``heads``; checked against ``model(x)``), plain ``torch.autograd.grad``
of the target's logit, and each method's defining equation with explicit loops.
"""

from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from test_wrapper import _snapshot, assert_intact

from legrad import LeWrapper
from legrad.eval.baselines import METHODS, attention_rollout, chefercam, gradcam, legrad

TINY = dict(pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=10)
TIMM = {
    "token": ("vit_tiny_patch16_224", {}),
    "avg-reg": ("vit_tiny_patch16_224", dict(global_pool="avg", reg_tokens=2, fc_norm=True)),
    "distilled": ("deit_tiny_distilled_patch16_224", {}),
    "map": ("vit_tiny_patch16_224", dict(global_pool="map")),
}
BLOCK_METHODS = ["raw_attention", "rollout", "gradcam", "chefercam"]


def _nontrivial(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random norms, heads and prefix tokens (timm/torchvision initialise some to zero or identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=g, dtype=mod.weight.dtype))
                mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g, dtype=mod.bias.dtype))
        for name, p in model.named_parameters():
            if any(k in name for k in ("head", "heads", "cls_token", "dist_token", "class_token", "reg_token")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


def make_timm(kind: str, seed: int = 0) -> torch.nn.Module:
    name, extra = TIMM[kind]
    torch.manual_seed(seed)
    return _nontrivial(timm.create_model(name, **TINY, **extra).double(), seed)


def make_torchvision(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    return _nontrivial(model.double(), seed)


# ----------------------------------------------------------------------------- explicit forwards
def _softmax_attention(q, k, scale):
    return ((q * scale) @ k.transpose(-1, -2)).softmax(-1)


def _timm_forward(model, img):
    """``(attention inputs h_l, probabilities A_l [1, heads, N, N], logits [1, K], prefix tokens)``."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(img)))
    hs, attns = [], []
    for blk in model.blocks:
        h = blk.norm1(x)
        at = blk.attn
        n = h.shape[1]
        q, k, v = at.qkv(h).reshape(1, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        a = _softmax_attention(at.q_norm(q), at.k_norm(k), at.scale)
        o = at.proj(at.norm((a @ v).transpose(1, 2).reshape(1, n, -1)))
        x = x + blk.ls1(o)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        hs.append(h)
        attns.append(a)
    return hs, attns, model.forward_head(model.norm(x)), model.num_prefix_tokens, x


def _torchvision_forward(model, img):
    x = model._process_input(img)
    x = torch.cat([model.class_token, x], dim=1) + model.encoder.pos_embedding
    hs, attns = [], []
    for blk in model.encoder.layers:
        h = blk.ln_1(x)
        mha = blk.self_attention
        e, nh, n = mha.embed_dim, mha.num_heads, h.shape[1]
        q, k, v = (t.reshape(1, n, nh, e // nh).transpose(1, 2)
                   for t in F.linear(h, mha.in_proj_weight, mha.in_proj_bias).split(e, dim=-1))
        a = _softmax_attention(q, k, (e // nh) ** -0.5)
        x = x + mha.out_proj((a @ v).transpose(1, 2).reshape(1, n, e))
        x = x + blk.mlp(blk.ln_2(x))
        hs.append(h)
        attns.append(a)
    return hs, attns, model.heads(model.encoder.ln(x)[:, 0]), 1, x


def _pooled_row(kind: str, mat: torch.Tensor, npt: int) -> torch.Tensor:
    """Row(s) of a ``[N, N]`` token matrix that the pooled output reads."""
    if kind == "avg-reg":
        return mat[npt:].mean(0)
    if kind == "distilled":
        return mat[:2].mean(0)
    return mat[0]


def _to_map(patch_rel, grid, size):
    m = F.interpolate(patch_rel.reshape(1, 1, *grid).double(), size=size, mode="bilinear", align_corners=False)[0, 0]
    lo, hi = m.min(), m.max()
    return torch.zeros_like(m) if hi - lo <= 0 else (m - lo) / (hi - lo)


def oracle(method: str, kind: str, model, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[B, P, H, W]`` float64 maps of one method, image by image and class by class."""
    model = copy.deepcopy(model).eval()
    forward = _torchvision_forward if kind == "torchvision" else _timm_forward
    grid = (image.shape[-2] // 8, image.shape[-1] // 8)
    p_count = target.shape[-1]
    out = torch.zeros(image.shape[0], p_count, *image.shape[-2:], dtype=torch.float64)
    for b in range(image.shape[0]):
        img = image[b : b + 1]
        with torch.no_grad():
            torch.testing.assert_close(forward(model, img)[2], model(img), atol=1e-10, rtol=0)  # the oracle is the model
        for p in range(p_count):
            c = int(target[b, p] if target.ndim == 2 else target[p])
            hs, attns, logits, npt, x = forward(model, img)
            s = logits[0, c]
            eye = torch.eye(attns[0].shape[-1], dtype=torch.float64)
            if method == "raw_attention" and kind == "map":
                pool = model.attn_pool  # the pooler's latent query attends to the normed patch tokens
                z = model.norm(x)[:, npt:]
                q = pool.q(pool.latent).reshape(1, pool.latent_len, pool.num_heads, pool.head_dim).transpose(1, 2)
                kk, _ = pool.kv(z).reshape(1, z.shape[1], 2, pool.num_heads, pool.head_dim).permute(2, 0, 3, 1, 4)
                rel = _softmax_attention(pool.q_norm(q), pool.k_norm(kk), pool.scale)[0].mean(0).mean(0)
            elif method == "raw_attention":
                rel = _pooled_row(kind, attns[-1][0].mean(0), npt)[npt:]
            elif method == "rollout":
                r = eye
                for a in attns:
                    r = (0.5 * a[0].mean(0) + 0.5 * eye) @ r
                rel = _pooled_row(kind, r, npt)[npt:]
            elif method == "gradcam":
                (g,) = torch.autograd.grad(s, hs[-1])
                tokens, weights = hs[-1][0, npt:], g[0, npt:].mean(0)
                rel = torch.stack([torch.relu((tokens[i] * weights).sum()) for i in range(tokens.shape[0])])
            elif method == "chefercam":
                r = eye
                for a, g in zip(attns, torch.autograd.grad(s, attns)):
                    r = r + torch.relu(g[0] * a[0]).mean(0) @ r
                rel = _pooled_row(kind, r, npt)[npt:]
            else:
                raise AssertionError(method)
            out[b, p] = _to_map(rel.detach(), grid, tuple(image.shape[-2:]))
    return out


def _image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------- oracle agreement
@pytest.mark.parametrize("kind", ["token", "avg-reg", "distilled", "torchvision"])
@pytest.mark.parametrize("method", BLOCK_METHODS)
def test_matches_oracle(kind, method):
    model = make_torchvision() if kind == "torchvision" else make_timm(kind)
    before = _snapshot(model)
    image, target = _image(), torch.tensor([7, 2, 7])
    got = METHODS[method](model, image=image, target=target)
    assert got.shape == (2, 3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), oracle(method, kind, model, image, target), atol=1e-5, rtol=0)
    assert_intact(model, before)


@pytest.mark.parametrize("method", ["raw_attention", "gradcam"])
def test_map_pooled_classifier_matches_oracle(method):
    """``map`` heads pool with a latent query, as SigLIP towers do: raw attention is the pooler's attention
    (mean over heads and latent rows), GradCAM differentiates the logit through the pooler."""
    model = make_timm("map")
    before = _snapshot(model)
    image, target = _image(), torch.tensor([[1, 4], [9, 1]])
    got = METHODS[method](model, image=image, target=target)
    torch.testing.assert_close(got.double(), oracle(method, "map", model, image, target), atol=1e-5, rtol=0)
    assert_intact(model, before)


def test_map_pooled_classifier_refuses_rollout_and_chefercam():
    model = make_timm("map")
    image = _image(1)
    with pytest.raises(NotImplementedError, match="attention pooler"):
        attention_rollout(model, image=image, target=1)
    with pytest.raises(NotImplementedError, match="pools with attention"):
        chefercam(model, image=image, target=1)


def test_per_image_targets_equal_single_image_runs():
    model = make_timm("token")
    image = _image()
    target = torch.tensor([[3, 5], [8, 3]])
    for fn in (gradcam, chefercam, legrad):
        both = fn(model, image=image, target=target)
        for b in range(2):
            torch.testing.assert_close(both[b : b + 1], fn(model, image=image[b : b + 1], target=target[b].tolist()))
    # int, list and tensor targets are the same request
    torch.testing.assert_close(gradcam(model, image=image, target=4), gradcam(model, image=image, target=[4]))


def test_legrad_entry_and_wrapper_match_compute_legrad():
    model = make_torchvision()
    image = _image()
    want = LeWrapper(model).compute_legrad(image=image, target=[1, 2])
    torch.testing.assert_close(legrad(model, image=image, target=[1, 2]), want)
    wrapper = LeWrapper(model, layer_index=-1)
    torch.testing.assert_close(chefercam(wrapper, image=image, target=[1, 2]),
                               chefercam(model, image=image, target=[1, 2]))


@pytest.mark.parametrize("method", list(METHODS))
def test_targets_are_checked_as_compute_legrad_checks_them(method):
    model = make_timm("token")
    image = _image()
    fn = METHODS[method]
    for bad in (10, [1, -1], torch.tensor([[1, 2]]), torch.tensor([1.0]), "cat", [], None):
        with pytest.raises((TypeError, ValueError)) as want:
            LeWrapper(model).compute_legrad(image=image, target=bad)
        with pytest.raises(type(want.value), match=re.escape(str(want.value))):
            fn(model, image=image, target=bad)
    text = F.normalize(torch.randn(2, 10, dtype=torch.float64), dim=-1)
    with pytest.raises(TypeError, match="image classifier"):
        fn(model, text, image)


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassificationWithTeacher"])
def test_transformers_classifiers_run_every_method(cls_name):
    transformers = pytest.importorskip("transformers")
    config_cls = transformers.ViTConfig if cls_name.startswith("ViT") else transformers.DeiTConfig
    torch.manual_seed(0)
    model = _nontrivial(getattr(transformers, cls_name)(config_cls(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10)), 0)
    before = _snapshot(model)
    image = _image().float()
    for name, fn in METHODS.items():
        maps = fn(model, image=image, target=[3, 8])
        assert maps.shape == (2, 2, 32, 32) and bool(torch.isfinite(maps).all()), name
        assert float(maps.min()) >= 0 and float(maps.max()) <= 1, name
    assert_intact(model, before)
