"""Hugging Face transformers models behind LeWrapper: oracle agreement, NaFlex padding, model integrity.

Every model is a tiny random-init config built here (no downloads). The oracles re-implement LeGrad
independently of legrad: the model's own transformers modules run the tower, the explained attention
is recomputed with explicit softmax probabilities ``A`` (a leaf requiring grad), and the gradient is
taken one image, one prompt and one layer at a time.
"""

from __future__ import annotations

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

from helpers.hf_models import (  # noqa: E402
    CLIP_KINDS,
    SQUARE_KINDS,
    TEXT,
    VISION,
    assert_unchanged,
    embed_dim,
    hf_oracle,
    layer_forward,
    make_model,
    naflex_batch,
    oracle_tokens,
    rand_image,
    siglip_head,
    snapshot,
    tiny_tokenizer,
    unit_text,
)

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.hf import SUPPORTED_HF_CLASSES, encode_text, pooled_text_features  # noqa: E402


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", SQUARE_KINDS)
def test_oracle_forward_matches_model(kind):
    """Guards the oracle: its tower (model modules + explicit attention) gives the model's own embedding."""
    model = make_model(kind)
    image = rand_image(1, 32, 48)
    with torch.no_grad():
        x = oracle_tokens(model, image)
        for layer in model.vision_model.encoder.layers:
            x = layer_forward(layer, x)
        if kind in CLIP_KINDS:
            ours = model.visual_projection(model.vision_model.post_layernorm(x[:, 0]))
        else:
            a, feature_fn = siglip_head(model, x)
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
            x = oracle_tokens(model, inputs["pixel_values"][b : b + 1, : gh * gw], inputs["spatial_shapes"][b : b + 1])
            for layer in model.vision_model.encoder.layers:
                x = layer_forward(layer, x)
            a, feature_fn = siglip_head(model, x)
            torch.testing.assert_close(feature_fn(a)[0], theirs[b], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", SQUARE_KINDS + ["siglip2"])
def test_model_left_unchanged(kind):
    model = make_model(kind)
    before = snapshot(model)
    # SigLIP towers also run the text tower once, for the empty-prompt correction.
    w = LeWrapper(model, tokenizer=tiny_tokenizer())
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



@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encode_text_normalises_the_models_own_embedding(kind):
    model = make_model(kind)
    tok = tiny_tokenizer()
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
