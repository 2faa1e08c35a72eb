"""Slow, obviously-correct LeGrad for image classifiers (tests only; nothing imported from ``legrad``).

Per image, target and layer: the model's own modules on a deep copy in eval mode, the explained
attention's post-softmax probabilities as an explicit leaf requiring grad, the layer's logits from the
mean of all of the block's tokens through the model's own final norm and head, one autograd call.
Returns the summed patch-grid maps ``[B, P, gh, gw]`` (float64, before upsampling and min-max);
:func:`finish` turns them into what ``compute_legrad`` returns.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from .oracles import ExplicitLatentPool, block_output, explicit_mha


def _targets_for(target: torch.Tensor, b: int) -> list[int]:
    return (target[b] if target.ndim == 2 else target).tolist()


def finish(grids: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Bilinear upsampling to ``size`` (None: stay on the grid) and min-max per (image, target)."""
    maps = grids if size is None else F.interpolate(grids, size=size, mode="bilinear", align_corners=False)
    flat = maps.flatten(2)
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    out = torch.where(hi > lo, (flat - lo) / (hi - lo).clamp_min(1e-300), torch.zeros_like(flat))
    return out.reshape(maps.shape).float()


# ------------------------------------------------------------------------------------------------ timm
def timm_classifier_grids(model, image: torch.Tensor, target: torch.Tensor, layer_index: int) -> torch.Tensor:
    """timm ViT/DeiT/EVA classifiers through timm's own ``forward_features`` (unfused attention, hooked on a
    deep copy resized with timm's ``set_input_size``). ``map`` heads: the pooler is written out with its
    attention as the leaf and timm's ``forward_head`` gives the logits."""
    H, W = image.shape[-2:]
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model.set_input_size(img_size=(H, W))
    gh, gw = model.patch_embed.grid_size
    depth = len(model.blocks)
    npt = model.num_prefix_tokens
    by_map = getattr(model, "attn_pool", None) is not None
    if by_map:
        explicit = ExplicitLatentPool(model.attn_pool)
        model.attn_pool = explicit
    distilled = hasattr(model, "head_dist")
    out = torch.zeros(image.shape[0], target.shape[-1], gh, gw, dtype=torch.float64)
    for b in range(image.shape[0]):
        img = image[b : b + 1]
        for i in range(layer_index % depth, depth):
            for p, c in enumerate(_targets_for(target, b)):
                if by_map:
                    with torch.no_grad():
                        z, _ = block_output(model, img, i, leaf_attention=False)
                    logits = model.forward_head(model.norm(z))
                    attn, drop = explicit.attn, 0 if not model.pool_include_prefix else npt
                else:
                    z, attn = block_output(model, img, i, leaf_attention=True)
                    y = model.norm(z.mean(1))
                    if distilled:
                        logits = 0.5 * (model.head(y) + model.head_dist(y))
                    else:
                        logits = model.head(model.fc_norm(y))
                    drop = npt
                (g,) = torch.autograd.grad(logits[0, c], attn)
                out[b, p] += g.clamp(min=0).mean(dim=(1, 2))[0, drop:].reshape(gh, gw).double()
    return out


# ------------------------------------------------------------------------------------------------ torchvision
def _torchvision_tokens(model, img):
    x = model._process_input(img)  # the model's own patchify (asserts its native image size)
    x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
    return x + model.encoder.pos_embedding


def torchvision_forward(model, image: torch.Tensor) -> torch.Tensor:
    """The oracle's block-by-block forward, for checking it against ``model(image)``."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        x = _torchvision_tokens(model, image)
        for blk in model.encoder.layers:
            h = blk.ln_1(x)
            attn, out_fn = explicit_mha(blk.self_attention, h, h)
            x = x + out_fn(attn)
            x = x + blk.mlp(blk.ln_2(x))
        return model.heads(model.encoder.ln(x)[:, 0])


def torchvision_grids(model, image: torch.Tensor, target: torch.Tensor, layer_index: int) -> torch.Tensor:
    """torchvision ``VisionTransformer`` at its native size: explicit attention of block l, the layer's
    logits ``heads(encoder.ln(mean of block l's tokens))``."""
    model = copy.deepcopy(model).eval()
    layers = model.encoder.layers
    gh = gw = model.image_size // model.patch_size
    out = torch.zeros(image.shape[0], target.shape[-1], gh, gw, dtype=torch.float64)
    for b in range(image.shape[0]):
        with torch.no_grad():
            x = _torchvision_tokens(model, image[b : b + 1])
            for i in range(layer_index % len(layers)):
                x = layers[i](x)
        for i in range(layer_index % len(layers), len(layers)):
            blk = layers[i]
            for p, c in enumerate(_targets_for(target, b)):
                h = blk.ln_1(x)
                attn, out_fn = explicit_mha(blk.self_attention, h, h)
                x1 = x + out_fn(attn)
                z = x1 + blk.mlp(blk.ln_2(x1))
                logits = model.heads(model.encoder.ln(z.mean(1)))
                (g,) = torch.autograd.grad(logits[0, c], attn)
                out[b, p] += g.clamp(min=0).mean(dim=(1, 2))[0, 1:].reshape(gh, gw).double()
            with torch.no_grad():
                x = blk(x)
    return out


# ------------------------------------------------------------------------------------------------ transformers
def _hf_parts(model):
    name = type(model).__name__
    backbone = model.vit if hasattr(model, "vit") else model.deit
    if name == "DeiTForImageClassificationWithTeacher":
        heads = [model.cls_classifier, model.distillation_classifier]
    else:
        heads = [model.classifier]
    return backbone, heads, (2 if hasattr(model, "deit") else 1)


def _hf_explicit_layer(layer, x):
    """One ViT/DeiT layer with its attention probabilities as a leaf: ``(attn, block output)``."""
    attn_mod = layer.attention
    h = layer.layernorm_before(x)
    b, n, c = h.shape
    heads = attn_mod.num_attention_heads

    def split(t):
        return t.reshape(b, n, heads, -1).transpose(1, 2)

    q, k, v = split(attn_mod.q_proj(h)), split(attn_mod.k_proj(h)), split(attn_mod.v_proj(h))
    a = ((q @ k.transpose(-1, -2)) * attn_mod.scaling).softmax(-1).detach().requires_grad_(True)
    o = attn_mod.o_proj((a @ v.detach()).transpose(1, 2).reshape(b, n, -1))
    x1 = x + o
    return a, x1 + layer.mlp(layer.layernorm_after(x1))


def hf_grids(model, image: torch.Tensor, target: torch.Tensor, layer_index: int) -> torch.Tensor:
    """transformers ViT/DeiT classifiers: the model's own embeddings (interpolated positions) and layers;
    the layer's logits are the classifier(s) on ``layernorm(mean of block l's tokens)`` (averaged for the
    teacher-distilled DeiT)."""
    model = copy.deepcopy(model).eval()
    backbone, heads, npt = _hf_parts(model)
    ps = backbone.embeddings.patch_size
    gh, gw = image.shape[-2] // ps, image.shape[-1] // ps
    layers = backbone.layers
    out = torch.zeros(image.shape[0], target.shape[-1], gh, gw, dtype=torch.float64)
    for b in range(image.shape[0]):
        with torch.no_grad():
            x = backbone.embeddings(image[b : b + 1], interpolate_pos_encoding=True)
            for i in range(layer_index % len(layers)):
                x = layers[i](x)
        for i in range(layer_index % len(layers), len(layers)):
            for p, c in enumerate(_targets_for(target, b)):
                attn, z = _hf_explicit_layer(layers[i], x)
                y = backbone.layernorm(z.mean(1))
                logits = sum(h(y) for h in heads) / len(heads)
                (g,) = torch.autograd.grad(logits[0, c], attn)
                out[b, p] += g.clamp(min=0).mean(dim=(1, 2))[0, npt:].reshape(gh, gw).double()
            with torch.no_grad():
                x = layers[i](x)
    return out


def hf_layer_agrees(model, image: torch.Tensor) -> bool:
    """Whether the oracle's explicit layer reproduces the model's own layer (validates the oracle)."""
    model = copy.deepcopy(model).eval()
    backbone, _, _ = _hf_parts(model)
    with torch.no_grad():
        x = backbone.embeddings(image, interpolate_pos_encoding=True)
        for layer in backbone.layers:
            _, z = _hf_explicit_layer(layer, x)
            ref = layer(x)
            ref = ref[0] if isinstance(ref, tuple) else ref
            if not torch.allclose(z, ref, atol=1e-5, rtol=0):
                return False
            x = ref
    return True
