"""Hugging Face models behind LeWrapper, beyond the core oracle checks: SigLIP's empty-prompt
correction, real processor outputs end to end, a CLIP model against its OpenCLIP twin, and the
query-blocked path. Tiny random-init models and the oracle come from ``helpers.hf_models``.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed: the [hf] extra is optional (pip install 'legrad_torch[hf]')"
)

from helpers.hf_models import (  # noqa: E402
    VISION,
    embed_dim,
    hf_oracle,
    make_model,
    naflex_batch,
    rand_image,
    tiny_tokenizer,
    unit_text,
)

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.hf import encode_text, pooled_text_features  # noqa: E402


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
    tok = tiny_tokenizer()
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
