"""Hugging Face transformers models behind LeWrapper: oracle agreement, NaFlex padding, model integrity.

Every model is a tiny random-init config built here (no downloads). The oracles re-implement LeGrad
independently of legrad: the model's own transformers modules run the tower, the explained attention
is recomputed with explicit softmax probabilities ``A`` (a leaf requiring grad), and the gradient is
taken one image, one prompt and one layer at a time.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the [hf] extra is optional (pip install 'legrad_torch[hf]')"
)

from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.hf import SUPPORTED_HF_CLASSES, encode_text, pooled_text_features  # noqa: E402

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
def _layer_forward(layer, x):
    """One transformers encoder layer, called as the model calls it (4.x returns a tuple, 5.x a tensor)."""
    params = inspect.signature(layer.forward).parameters
    kwargs = {"causal_attention_mask": None} if "causal_attention_mask" in params else {}
    out = layer(x, None, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _explicit_self_attention(attn, h):
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


def _explicit_pool_attention(mha, probe, tokens):
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


def _min_max(m):
    lo, hi = m.min(), m.max()
    return torch.zeros_like(m) if hi - lo <= 0 else (m - lo) / (hi - lo)


def _tokens(model, pixels, spatial_shapes=None):
    """Input of the first encoder layer, from the model's own modules (one unpadded image)."""
    vm = model.vision_model
    if spatial_shapes is not None:
        return vm.embeddings(pixels, spatial_shapes)
    x = vm.embeddings(pixels, interpolate_pos_encoding=True)
    return vm.pre_layrnorm(x) if hasattr(vm, "pre_layrnorm") else x


def _siglip_head(model, x):
    """(A, feature_fn) for the pooling head applied to post_layernorm(x)."""
    vm = model.vision_model
    head = vm.head
    tokens = vm.post_layernorm(x)
    a, out_fn = _explicit_pool_attention(head.attention, head.probe.expand(x.shape[0], -1, -1), tokens)

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
                x = _tokens(model, image["pixel_values"][b : b + 1, : gh * gw], image["spatial_shapes"][b : b + 1])
            else:
                gh, gw = image.shape[-2] // patch_size, image.shape[-1] // patch_size
                x = _tokens(model, image[b : b + 1])
            for i in range(start):
                x = _layer_forward(layers[i], x)
        grid = torch.zeros(len(prompts), gh, gw, dtype=torch.float64)
        for i in range(start, len(layers)):
            layer = layers[i]
            if kind in CLIP_KINDS:
                a, out_fn = _explicit_self_attention(layer.self_attn, layer.layer_norm1(x))

                def feature_fn(a_, x=x, layer=layer, out_fn=out_fn):
                    x1 = x + out_fn(a_)
                    z = x1 + layer.mlp(layer.layer_norm2(x1))
                    return model.visual_projection(model.vision_model.post_layernorm(z.mean(1)))

                prefix = 1
            else:
                with torch.no_grad():
                    x_l = _layer_forward(layer, x)
                a, feature_fn = _siglip_head(model, x_l)
                prefix = 0
            for p, t in enumerate(prompts):
                s = (F.normalize(feature_fn(a), dim=-1)[0] * t.to(a.dtype)).sum()
                (g,) = torch.autograd.grad(s, a)
                grid[p] += g.clamp(min=0).mean(dim=(1, 2))[0, prefix:].reshape(gh, gw).double()
            with torch.no_grad():
                x = _layer_forward(layer, x)
        if empty is not None:
            suppress = _min_max(grid[-1]) > threshold
            grid = grid[:-1].masked_fill(suppress, 0.0)
        H, W = gh * patch_size, gw * patch_size
        up = F.interpolate(grid[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        out.append(torch.stack([_min_max(m) for m in up]).float())
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


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", SQUARE_KINDS)
def test_oracle_forward_matches_model(kind):
    """Guards the oracle: its tower (model modules + explicit attention) gives the model's own embedding."""
    model = make_model(kind)
    image = rand_image(1, 32, 48)
    with torch.no_grad():
        x = _tokens(model, image)
        for layer in model.vision_model.encoder.layers:
            x = _layer_forward(layer, x)
        if kind in CLIP_KINDS:
            ours = model.visual_projection(model.vision_model.post_layernorm(x[:, 0]))
        else:
            a, feature_fn = _siglip_head(model, x)
            ours = feature_fn(a)
        theirs = pooled_text_features(model.get_image_features(pixel_values=image, interpolate_pos_encoding=True))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SQUARE_KINDS)
@pytest.mark.parametrize("size,layer_index,p", [((32, 32), -2, 3), ((32, 48), -1, 1), ((48, 40), 0, 2)])
def test_matches_oracle(kind, size, layer_index, p):
    model = make_model(kind)
    image = rand_image(2, *size)
    text = unit_text(p, embed_dim(model))
    wrapper = LeWrapper(model, layer_index=layer_index, apply_correction=False)
    maps = wrapper.compute_legrad(text, image=image)
    expected = hf_oracle(model, kind, image, text, layer_index)
    assert maps.shape == (2, p, *size) and maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_larger_non_square_and_per_image_prompts(kind):
    model = make_model(kind)
    image = rand_image(2, 64, 40)
    text = unit_text(2, embed_dim(model), batch=2)
    maps = LeWrapper(model, apply_correction=False).compute_legrad(text, image=image)
    torch.testing.assert_close(maps, hf_oracle(model, kind, image, text, -2), atol=1e-5, rtol=0)


def test_float64_matches_oracle_tightly():
    model = make_model("clip").double()
    image = rand_image(1, 40, 32).double()
    text = unit_text(2, 24).double()
    maps = LeWrapper(model, layer_index=0).compute_legrad(text, image=image)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, hf_oracle(model, "clip", image, text, 0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("layer_index", [-2, 0])
def test_siglip2_padded_batch_matches_unpadded_oracle(layer_index):
    model = make_model("siglip2")
    inputs = naflex_batch([(3, 4), (4, 5), (2, 2)], max_patches=24)
    text = unit_text(3, 32)
    maps = LeWrapper(model, layer_index=layer_index, apply_correction=False).compute_legrad(text, image=inputs)
    expected = hf_oracle(model, "siglip2", inputs, text, layer_index)
    assert isinstance(maps, list) and [tuple(m.shape) for m in maps] == [(3, 24, 32), (3, 32, 40), (3, 16, 16)]
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_siglip2_padding_gets_no_relevance_and_uniform_batch_is_a_tensor():
    model = make_model("siglip2")
    w = LeWrapper(model, apply_correction=False)
    text = unit_text(2, 32)
    inputs = naflex_batch([(3, 5), (3, 5)], max_patches=20)
    maps = w.compute_legrad(text, image=inputs)
    assert isinstance(maps, torch.Tensor) and maps.shape == (2, 2, 24, 40)
    torch.testing.assert_close(maps, hf_oracle(model, "siglip2", inputs, text, -2), atol=1e-5, rtol=0)
    # The padding's content must not matter at all, nor how much of it there is.
    junk = dict(inputs)
    junk["pixel_values"] = inputs["pixel_values"].clone()
    junk["pixel_values"][:, 15:] = 100.0 * torch.randn(2, 5, 192)
    torch.testing.assert_close(w.compute_legrad(text, image=junk), maps, atol=1e-6, rtol=0)
    longer = naflex_batch([(3, 5), (3, 5)], max_patches=32)
    longer["pixel_values"][:, :15] = inputs["pixel_values"][:, :15]
    torch.testing.assert_close(w.compute_legrad(text, image=longer), maps, atol=1e-6, rtol=0)
    # Keyword form equals the mapping form.
    kw = w.compute_legrad(text, image=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"],
                          spatial_shapes=inputs["spatial_shapes"])
    torch.testing.assert_close(kw, maps, atol=0, rtol=0)


def test_siglip2_oracle_forward_matches_padded_model():
    """Guards the NaFlex oracle: an unpadded image gives the padded batch's own embedding."""
    model = make_model("siglip2")
    inputs = naflex_batch([(3, 4), (2, 5)], max_patches=16)
    with torch.no_grad():
        theirs = pooled_text_features(model.get_image_features(**inputs))
        for b in range(2):
            gh, gw = inputs["spatial_shapes"][b].tolist()
            x = _tokens(model, inputs["pixel_values"][b : b + 1, : gh * gw], inputs["spatial_shapes"][b : b + 1])
            for layer in model.vision_model.encoder.layers:
                x = _layer_forward(layer, x)
            a, feature_fn = _siglip_head(model, x)
            torch.testing.assert_close(feature_fn(a)[0], theirs[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SQUARE_KINDS + ["siglip2"])
def test_model_left_unchanged(kind):
    model = make_model(kind)
    before = snapshot(model)
    # SigLIP towers also run the text tower once, for the empty-prompt correction.
    w = LeWrapper(model, tokenizer=_tiny_tokenizer())
    text = unit_text(2, embed_dim(model))
    if kind == "siglip2":
        w.compute_legrad(text, image=naflex_batch([(3, 4), (2, 2)], max_patches=16))
    else:
        w.compute_legrad(text, image=rand_image(2, 32, 40))
    assert_unchanged(before, model)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_train_mode_gives_eval_semantics_and_stays_in_train_mode(kind):
    model = make_model(kind, attention_dropout=0.5)
    image, text = rand_image(2, 32, 32), unit_text(2, embed_dim(model))
    expected = LeWrapper(model, apply_correction=False).compute_legrad(text, image=image)
    model.train()
    before = snapshot(model)
    maps = LeWrapper(model, apply_correction=False).compute_legrad(text, image=image)
    torch.testing.assert_close(maps, expected, atol=0, rtol=0)
    assert_unchanged(before, model)
    assert model.training and model.vision_model.encoder.layers[0].self_attn.training


@pytest.mark.parametrize("kind", ["clip", "siglip2"])
def test_one_tower_forward_per_call(kind):
    """All images and prompts share one run of the embeddings (no per-prompt forward)."""
    model = make_model(kind)
    calls = []
    handle = model.vision_model.embeddings.register_forward_hook(lambda *a: calls.append(1))
    try:
        text = unit_text(5, embed_dim(model))
        w = LeWrapper(model, apply_correction=False)
        if kind == "siglip2":
            w.compute_legrad(text, image=naflex_batch([(3, 4), (4, 4)], max_patches=16))
        else:
            w.compute_legrad(text, image=rand_image(3, 32, 32))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_threads_agree_with_sequential_calls():
    model = make_model("siglip")
    w = LeWrapper(model, apply_correction=False)
    jobs = [(unit_text(2, 32, seed=s), rand_image(1, 32, 24 + 8 * s, seed=s)) for s in range(4)]
    expected = [w.compute_legrad(t, image=i) for t, i in jobs]
    results: list = [None] * len(jobs)

    def run(k):
        results[k] = w.compute_legrad(jobs[k][0], image=jobs[k][1])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_half_precision_model(kind, dtype):
    model = make_model(kind)
    text = unit_text(2, embed_dim(model))
    image = naflex_batch([(4, 4)], max_patches=16) if kind == "siglip2" else rand_image(1, 32, 32)
    ref = LeWrapper(model, apply_correction=False).compute_legrad(text, image=image)
    model = model.to(dtype)
    before = snapshot(model)
    maps = LeWrapper(model, apply_correction=False).compute_legrad(text, image=image)
    assert maps.dtype == torch.float32 and maps.shape == ref.shape and torch.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1
    # Half-precision weights and activations perturb the map, but it stays the same map.
    assert torch.corrcoef(torch.stack([maps.flatten(), ref.flatten()]))[0, 1] > 0.9
    assert_unchanged(before, model)


def test_processor_output_mapping_is_accepted():
    model = make_model("clip")
    image, text = rand_image(1, 32, 32), unit_text(2, 24)
    w = LeWrapper(model)
    torch.testing.assert_close(w.compute_legrad(text, image={"pixel_values": image, "input_ids": None}),
                               w.compute_legrad(text, image=image), atol=0, rtol=0)
    torch.testing.assert_close(w.compute_legrad_clip(text, image=image), w.compute_legrad(text, image=image))


def test_unsupported_hf_class_names_the_supported_ones():
    vision_only = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    with pytest.raises(TypeError, match="CLIPModel.*Siglip2Model") as err:
        LeWrapper(vision_only)
    assert "full two-tower model" in str(err.value)
    assert set(SUPPORTED_HF_CLASSES) == {"CLIPModel", "MetaClip2Model", "AltCLIPModel", "ChineseCLIPModel",
                                         "SiglipModel", "Siglip2Model"}


def test_bad_inputs_raise_clear_errors():
    clip = LeWrapper(make_model("clip"))
    text = unit_text(1, 24)
    with pytest.raises(ValueError, match="does not match the image embedding width"):
        clip.compute_legrad(unit_text(1, 32), image=rand_image(1, 32, 32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        clip.compute_legrad(text, image=rand_image(1, 30, 32))
    with pytest.raises(TypeError, match="unexpected keyword"):
        clip.compute_legrad(text, image=rand_image(1, 32, 32), spatial_shapes=torch.ones(1, 2))
    with pytest.raises(ValueError, match="no 'pixel_values'"):
        clip.compute_legrad(text, image={"input_ids": torch.ones(1, 3)})
    s2 = LeWrapper(make_model("siglip2"))
    text = unit_text(1, 32)
    good = naflex_batch([(3, 4)], max_patches=16)
    with pytest.raises(ValueError, match="needs pixel_attention_mask and spatial_shapes"):
        s2.compute_legrad(text, image=good["pixel_values"])
    with pytest.raises(ValueError, match="pre-patchified"):
        s2.compute_legrad(text, image=torch.randn(1, 3, 32, 32), pixel_attention_mask=good["pixel_attention_mask"],
                          spatial_shapes=good["spatial_shapes"])
    bad = dict(good, spatial_shapes=torch.tensor([[5, 4]]))
    with pytest.raises(ValueError, match="more patches than"):
        s2.compute_legrad(text, image=bad)
    bad = dict(good, pixel_attention_mask=good["pixel_attention_mask"].flip(-1))
    with pytest.raises(ValueError, match="first spatial_shapes"):
        s2.compute_legrad(text, image=bad)
    with pytest.raises(ValueError, match="lacks"):
        s2.compute_legrad(text, image={"pixel_values": good["pixel_values"]})
    with pytest.raises(ValueError, match="B=2"):
        s2.compute_legrad(unit_text(1, 32, batch=2), image=good)


def test_pooled_text_features_handles_tensor_and_output_objects():
    model = make_model("clip")
    ids = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
    with torch.no_grad():
        out = model.get_text_features(input_ids=ids)
        direct = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(pooled_text_features(out), direct)
    torch.testing.assert_close(pooled_text_features(direct), direct)
    with pytest.raises(TypeError, match="text embedding"):
        pooled_text_features({"foo": 1})


def _tiny_tokenizer(max_length: int = 8):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["[PAD]", "[BOS]", "[EOS]", "[UNK]", "a", "photo", "of", "cat", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1),
                                                                                                ("[EOS]", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                model_max_length=max_length)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encode_text_normalises_the_models_own_embedding(kind):
    model = make_model(kind)
    tok = _tiny_tokenizer()
    prompts = ["a photo of a cat", "dog"]
    emb = encode_text(LeWrapper(model), tok, prompts)
    # SigLIP pads to the text tower's full context (as it was trained), not to the tokenizer's limit.
    padding = dict(padding="max_length", max_length=TEXT["max_position_embeddings"]) if kind == "siglip" else \
        dict(padding=True)
    ids = tok(prompts, return_tensors="pt", **padding)
    args = {k: v for k, v in ids.items() if k in inspect.signature(model.get_text_features).parameters}
    with torch.no_grad():
        expected = F.normalize(pooled_text_features(model.get_text_features(**args)), dim=-1)
    assert emb.shape == (2, embed_dim(model))
    torch.testing.assert_close(emb, expected)
    assert ids["input_ids"].shape[1] == (16 if kind == "siglip" else 7)


@pytest.mark.subprocess
def test_core_library_works_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import torch, open_clip, legrad\n"
        "m = open_clip.create_model('ViT-B-16', pretrained=None, embed_dim=16, vision_cfg=dict(image_size=16, "
        "patch_size=8, width=32, layers=2, head_width=16), text_cfg=dict(width=16, heads=1, layers=1, "
        "context_length=4))\n"
        "out = legrad.LeWrapper(m).compute_legrad(torch.nn.functional.normalize(torch.randn(1, 16), dim=-1), "
        "image=torch.randn(1, 3, 16, 16))\n"
        "assert out.shape == (1, 1, 16, 16)\n"
        "assert any('transformers' in n for n in legrad.supported_tower_names())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ correction
@pytest.mark.parametrize("layer_index", [-2, 0])
@pytest.mark.parametrize("threshold", [0.8, 0.4])
def test_siglip_empty_prompt_correction_matches_oracle(layer_index, threshold):
    model = make_model("siglip")
    image, text = rand_image(2, 32, 40), unit_text(3, 32)
    empty = unit_text(1, 32, seed=9)[0]
    w = LeWrapper(model, layer_index=layer_index, empty_text_embedding=empty, correction_threshold=threshold)
    maps = w.compute_legrad(text, image=image)
    expected = hf_oracle(model, "siglip", image, text, layer_index, empty=empty, threshold=threshold)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    # The correction must actually change something here, or this test would prove nothing.
    assert (maps - hf_oracle(model, "siglip", image, text, layer_index)).abs().max() > 0.05
    torch.testing.assert_close(w.compute_legrad_siglip(text, image=image), maps, atol=0, rtol=0)
    off = w.compute_legrad_siglip(text, image=image, apply_correction=False)
    torch.testing.assert_close(off, hf_oracle(model, "siglip", image, text, layer_index), atol=1e-5, rtol=0)


def test_siglip2_correction_is_per_image_on_its_own_patches():
    model = make_model("siglip2")
    inputs = naflex_batch([(3, 4), (4, 5)], max_patches=24)
    text = unit_text(2, 32)
    empty = unit_text(1, 32, seed=9)[0]
    w = LeWrapper(model, empty_text_embedding=empty, correction_threshold=0.6)
    maps = w.compute_legrad(text, image=inputs)
    expected = hf_oracle(model, "siglip2", inputs, text, -2, empty=empty, threshold=0.6)
    for got, want in zip(maps, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    off = w.compute_legrad_siglip(text, image=inputs, apply_correction=False)
    for got, want in zip(off, hf_oracle(model, "siglip2", inputs, text, -2), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_correction_embedding_from_the_tokenizer(kind):
    model = make_model(kind)
    tok = _tiny_tokenizer()
    from legrad.engine.correction import EMPTY_PROMPT

    empty = encode_text(model, tok, EMPTY_PROMPT)[0]
    text = unit_text(2, 32)
    image = naflex_batch([(3, 4)], max_patches=16) if kind == "siglip2" else rand_image(1, 32, 32)
    via_tokenizer = LeWrapper(model, tokenizer=tok).compute_legrad(text, image=image)
    via_embedding = LeWrapper(model, empty_text_embedding=empty).compute_legrad(text, image=image)
    torch.testing.assert_close(via_tokenizer, via_embedding, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_correction_without_tokenizer_or_embedding_is_a_clear_error(kind):
    w = LeWrapper(make_model(kind))
    image = naflex_batch([(3, 4)], max_patches=16) if kind == "siglip2" else rand_image(1, 32, 32)
    with pytest.raises(ValueError, match="empty-prompt correction.*tokenizer=processor.*AutoProcessor"):
        w.compute_legrad(unit_text(1, 32), image=image)
    with pytest.raises(TypeError, match="compute_legrad_siglip does not apply"):
        LeWrapper(make_model("clip")).compute_legrad_siglip(unit_text(1, 24), image=rand_image(1, 32, 32))


# ------------------------------------------------------------------------------------------------ processors
def _pil(h: int, w: int, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())


def test_real_processor_outputs_end_to_end():
    """Locally built image processors (no download): their BatchFeature goes straight in."""
    clip = make_model("clip")
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    inputs = proc(images=[_pil(50, 90, 0), _pil(64, 64, 1)], return_tensors="pt")
    text = unit_text(2, 24)
    maps = LeWrapper(clip).compute_legrad(text, image=inputs)
    torch.testing.assert_close(maps, hf_oracle(clip, "clip", inputs["pixel_values"], text, -2), atol=1e-5, rtol=0)

    siglip2 = make_model("siglip2")
    proc2 = transformers.Siglip2ImageProcessor(patch_size=8, max_num_patches=16)
    inputs2 = proc2(images=[_pil(50, 90, 2), _pil(90, 40, 3), _pil(32, 32, 4)], return_tensors="pt")
    text2 = unit_text(2, 32)
    maps2 = LeWrapper(siglip2, apply_correction=False).compute_legrad(text2, image=inputs2)
    shapes = inputs2["spatial_shapes"].tolist()
    assert len({tuple(s) for s in shapes}) > 1  # a ragged batch: one map per image at its own size
    assert [tuple(m.shape) for m in maps2] == [(2, h * 8, w * 8) for h, w in shapes]
    oracle = hf_oracle(siglip2, "siglip2", dict(inputs2), text2, -2)
    for got, want in zip(maps2, oracle, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ open_clip twin
def _open_clip_twin(hf):
    """An open_clip CLIP whose image tower holds the HF CLIPModel's weights (an independent implementation)."""
    import open_clip

    v = VISION
    twin = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=24, force_quick_gelu=True,
        vision_cfg=dict(image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
                        layers=v["num_hidden_layers"], head_width=v["hidden_size"] // v["num_attention_heads"],
                        mlp_ratio=v["intermediate_size"] / v["hidden_size"]),
        text_cfg=dict(width=32, heads=2, layers=1, context_length=8),
    ).eval()
    vm, vis = hf.vision_model, twin.visual
    with torch.no_grad():
        vis.conv1.weight.copy_(vm.embeddings.patch_embedding.weight)
        vis.class_embedding.copy_(vm.embeddings.class_embedding)
        vis.positional_embedding.copy_(vm.embeddings.position_embedding.weight)
        vis.proj.copy_(hf.visual_projection.weight.t())
        for dst, src in ((vis.ln_pre, vm.pre_layrnorm), (vis.ln_post, vm.post_layernorm)):
            dst.load_state_dict(src.state_dict())
        for blk, layer in zip(vis.transformer.resblocks, vm.encoder.layers, strict=True):
            a = layer.self_attn
            blk.attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            blk.attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            blk.attn.out_proj.load_state_dict(a.out_proj.state_dict())
            blk.ln_1.load_state_dict(layer.layer_norm1.state_dict())
            blk.ln_2.load_state_dict(layer.layer_norm2.state_dict())
            blk.mlp.c_fc.load_state_dict(layer.mlp.fc1.state_dict())
            blk.mlp.c_proj.load_state_dict(layer.mlp.fc2.state_dict())
    return twin


def test_open_clip_twin_has_the_same_embedding():
    hf = make_model("clip")
    twin = _open_clip_twin(hf)
    image = rand_image(2, 32, 32)
    with torch.no_grad():
        theirs = pooled_text_features(hf.get_image_features(pixel_values=image))
        torch.testing.assert_close(twin.encode_image(image), theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["legrad", "raw_attention", "rollout", "gradcam", "chefercam"])
def test_hf_clip_equals_its_open_clip_twin(method):
    """LeGrad and the baselines give the same maps on an HF CLIPModel and on open_clip holding its weights."""
    from legrad.eval import baselines

    hf = make_model("clip")
    twin = _open_clip_twin(hf)
    image, text = rand_image(2, 32, 32), unit_text(3, 24)
    fn = baselines.get_method(method)
    torch.testing.assert_close(fn(LeWrapper(hf), text, image), fn(LeWrapper(twin), text, image), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ query blocks
@pytest.mark.parametrize("kind", ["clip", "siglip", "siglip2"])
def test_tiny_query_blocks_equal_unblocked_and_oracle(kind, monkeypatch):
    """A 1-byte working budget forces one prompt and one query row per step: same maps as one block."""
    import legrad.engine.budget as budget

    model = make_model(kind)
    text = unit_text(3, embed_dim(model))
    wrapper = LeWrapper(model, layer_index=-2, apply_correction=False)
    image = naflex_batch([(3, 4), (2, 2)], max_patches=12) if kind == "siglip2" else rand_image(2, 32, 40)
    monkeypatch.setattr(budget, "DEFAULT_WORK_BYTES", 2**40)
    whole = wrapper.compute_legrad(text, image=image)
    monkeypatch.setattr(budget, "DEFAULT_WORK_BYTES", 1)
    monkeypatch.setattr(budget, "_MIN_EFFICIENT_BLOCK", 1)
    blocked = wrapper.compute_legrad(text, image=image)
    expected = hf_oracle(model, kind, image, text, -2)
    for got, ref, want in zip(blocked, whole, expected, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
