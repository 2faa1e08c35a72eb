"""Tiny random-init Hugging Face models and the independent LeGrad oracle of the HF adapter tests.

The oracle re-implements LeGrad without legrad: the model's own transformers modules run the tower, the
explained attention is recomputed with explicit softmax probabilities ``A`` (a leaf requiring grad), and
the gradient is taken one image, one prompt and one layer at a time. Import after
``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers

from helpers.oracles import min_max
from helpers.tiny_towers import same_bits

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, layer_norm_eps=1e-5)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
BERT_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                 max_position_embeddings=40, pad_token_id=0)

CLIP_KINDS = ["clip", "metaclip2", "altclip", "chinese_clip"]
SQUARE_KINDS = CLIP_KINDS + ["siglip"]


def make_model(kind: str, seed: int = 0, **vision_overrides):
    """A tiny random-init transformers model of ``kind`` in eval mode, with non-trivial LayerNorms."""
    T = transformers
    cls_name = {"clip": "CLIPModel", "metaclip2": "MetaClip2Model", "altclip": "AltCLIPModel",
                "chinese_clip": "ChineseCLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model"}[kind]
    if not hasattr(T, cls_name):
        pytest.skip(f"transformers {T.__version__} has no {cls_name}")
    vision = dict(VISION, **vision_overrides)
    torch.manual_seed(seed)
    if kind == "clip":
        model = T.CLIPModel(T.CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=24))
    elif kind == "metaclip2":
        model = T.MetaClip2Model(T.MetaClip2Config(text_config=TEXT, vision_config=vision, projection_dim=24))
    elif kind == "altclip":
        text = dict(BERT_TEXT, project_dim=24)
        model = T.AltCLIPModel(T.AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    elif kind == "chinese_clip":
        model = T.ChineseCLIPModel(T.ChineseCLIPConfig(text_config=BERT_TEXT, vision_config=vision, projection_dim=24))
    elif kind == "siglip":
        model = T.SiglipModel(T.SiglipConfig(text_config=TEXT, vision_config=vision))
    elif kind == "siglip2":
        vision.pop("image_size")
        vision.setdefault("num_patches", 16)
        model = T.Siglip2Model(T.Siglip2Config(text_config=TEXT, vision_config=vision))
    else:
        raise ValueError(kind)
    # Random-init LayerNorms (and SigLIP's zero biases) are trivial; perturb them so the tests see real ones.
    with torch.no_grad():
        for mod in model.vision_model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.add_(0.1 * torch.randn_like(mod.weight))
                mod.bias.add_(0.1 * torch.randn_like(mod.bias))
            elif isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                mod.bias.add_(0.02 * torch.randn_like(mod.bias))
            elif isinstance(mod, torch.nn.MultiheadAttention):
                mod.in_proj_bias.add_(0.02 * torch.randn_like(mod.in_proj_bias))
    return model.eval()


def embed_dim(model) -> int:
    proj = getattr(model, "visual_projection", None)
    return proj.out_features if proj is not None else model.config.vision_config.hidden_size


def unit_text(p: int, dim: int, seed: int = 1, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (p, dim) if batch is None else (batch, p, dim)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def rand_image(b: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def naflex_batch(shapes: list[tuple[int, int]], max_patches: int, patch_dim: int = 3 * 64, seed: int = 3):
    """Processor-like NaFlex inputs: each image's patches first, then padding (random junk values)."""
    g = torch.Generator().manual_seed(seed)
    b = len(shapes)
    pixel_values = torch.randn(b, max_patches, patch_dim, generator=g)
    mask = torch.zeros(b, max_patches, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask,
            "spatial_shapes": torch.tensor(shapes, dtype=torch.long)}


# ------------------------------------------------------------------------------------------------ oracles
def layer_forward(layer, x):
    """One transformers encoder layer, called as the model calls it (4.x returns a tuple, 5.x a tensor)."""
    params = inspect.signature(layer.forward).parameters
    kwargs = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
    out = layer(x, None, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def explicit_self_attention(attn, h):
    """(A leaf [B, H, N, N], out_fn) for a CLIP/SigLIP self-attention module, explicit softmax."""
    b, n, c = h.shape
    heads = attn.num_heads
    q = attn.q_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
    k = attn.k_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
    v = attn.v_proj(h).reshape(b, n, heads, -1).transpose(1, 2)
    a = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1).detach().requires_grad_(True)

    def out_fn(a_):
        return attn.out_proj((a_ @ v.detach()).transpose(1, 2).reshape(b, n, c))

    return a, out_fn


def explicit_pool_attention(mha, probe, tokens):
    """(A leaf [B, H, 1, N], out_fn) for the pooling head's nn.MultiheadAttention, explicit softmax."""
    e, heads = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.split(e)
    bq, bk, bv = mha.in_proj_bias.split(e)
    b, n = tokens.shape[:2]
    q = F.linear(probe, wq, bq).reshape(b, 1, heads, -1).transpose(1, 2)
    k = F.linear(tokens, wk, bk).reshape(b, n, heads, -1).transpose(1, 2)
    v = F.linear(tokens, wv, bv).reshape(b, n, heads, -1).transpose(1, 2)
    a = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1).detach().requires_grad_(True)

    def out_fn(a_):
        return mha.out_proj((a_ @ v.detach()).transpose(1, 2).reshape(b, 1, e))

    return a, out_fn


def oracle_tokens(model, pixels, spatial_shapes=None):
    """Input of the first encoder layer, from the model's own modules (one unpadded image)."""
    vm = model.vision_model
    if spatial_shapes is not None:
        return vm.embeddings(pixels, spatial_shapes)
    x = vm.embeddings(pixels, interpolate_pos_encoding=True)
    return vm.pre_layrnorm(x) if hasattr(vm, "pre_layrnorm") else x


def siglip_head(model, x):
    """(A, feature_fn) for the pooling head applied to post_layernorm(x)."""
    vm = model.vision_model
    head = vm.head
    tokens = vm.post_layernorm(x)
    a, out_fn = explicit_pool_attention(head.attention, head.probe.expand(x.shape[0], -1, -1), tokens)

    def feature_fn(a_):
        y = out_fn(a_)
        return (y + head.mlp(head.layernorm(y)))[:, 0]

    return a, feature_fn


@torch.enable_grad()  # robust to a test that left grad mode off globally
def hf_oracle(model, kind, image, text, layer_index, patch_size=8, empty=None, threshold=0.8):
    """LeGrad per image, prompt and layer. ``image``: [B, 3, H, W], or a NaFlex dict for siglip2.

    ``empty``: the [D] empty-prompt embedding; when given, each map is zeroed on the patches where the
    empty prompt's min-max normalised relevance exceeds ``threshold`` (before upsampling).

    Returns [B, P, H, W] (a list of [P, H_i, W_i] for NaFlex batches with different sizes).
    """
    model = copy.deepcopy(model).eval()
    layers = model.vision_model.encoder.layers
    start = layer_index % len(layers)
    naflex = isinstance(image, dict)
    batch = image["pixel_values"].shape[0] if naflex else image.shape[0]
    out = []
    for b in range(batch):
        t_b = text[b] if text.ndim == 3 else text
        prompts = [t_b[p] for p in range(t_b.shape[0])] + ([empty] if empty is not None else [])
        with torch.no_grad():
            if naflex:
                gh, gw = image["spatial_shapes"][b].tolist()
                x = oracle_tokens(model, image["pixel_values"][b : b + 1, : gh * gw], image["spatial_shapes"][b : b + 1])
            else:
                gh, gw = image.shape[-2] // patch_size, image.shape[-1] // patch_size
                x = oracle_tokens(model, image[b : b + 1])
            for i in range(start):
                x = layer_forward(layers[i], x)
        grid = torch.zeros(len(prompts), gh, gw, dtype=torch.float64)
        for i in range(start, len(layers)):
            layer = layers[i]
            if kind in CLIP_KINDS:
                a, out_fn = explicit_self_attention(layer.self_attn, layer.layer_norm1(x))

                def feature_fn(a_, x=x, layer=layer, out_fn=out_fn):
                    x1 = x + out_fn(a_)
                    z = x1 + layer.mlp(layer.layer_norm2(x1))
                    return model.visual_projection(model.vision_model.post_layernorm(z.mean(1)))

                prefix = 1
            else:
                with torch.no_grad():
                    x_l = layer_forward(layer, x)
                a, feature_fn = siglip_head(model, x_l)
                prefix = 0
            for p, t in enumerate(prompts):
                s = (F.normalize(feature_fn(a), dim=-1)[0] * t.to(a.dtype)).sum()
                (g,) = torch.autograd.grad(s, a)
                grid[p] += g.clamp(min=0).mean(dim=(1, 2))[0, prefix:].reshape(gh, gw).double()
            with torch.no_grad():
                x = layer_forward(layer, x)
        if empty is not None:
            suppress = min_max(grid[-1]) > threshold
            grid = grid[:-1].masked_fill(suppress, 0.0)
        H, W = gh * patch_size, gw * patch_size
        up = F.interpolate(grid[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        out.append(torch.stack([min_max(m) for m in up]).float())
    if len({o.shape for o in out}) == 1:
        return torch.stack(out)
    return out


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(model) -> dict:
    """Everything a call must leave unchanged."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks")
    configs = {name: getattr(mod, "config", None) for name, mod in model.named_modules()}
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "config": model.config.to_dict(),
        "attn": {n: (c._attn_implementation, getattr(c, "output_attentions", None),
                     getattr(c, "output_hidden_states", None))
                 for n, c in configs.items() if c is not None},
        "sub_attn": (model.config.vision_config._attn_implementation, model.config.text_config._attn_implementation),
        "hooks": {n: tuple(len(getattr(m, d, {}) or {}) for d in hook_dicts) for n, m in model.named_modules()},
        "global_hooks": (len(torch.nn.modules.module._global_forward_hooks),
                         len(torch.nn.modules.module._global_forward_pre_hooks)),
        "training": {n: m.training for n, m in model.named_modules()},
        "grads": [p.grad is None for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(before: dict, model) -> None:
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert same_bits(v, after["state"][k]), k
    for key in ("config", "attn", "sub_attn", "hooks", "global_hooks", "training", "grads", "requires_grad"):
        assert before[key] == after[key], key



def tiny_tokenizer(max_length: int = 8):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "photo", "of", "cat", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1),
                                                                                                ("[EOS]", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                model_max_length=max_length)

