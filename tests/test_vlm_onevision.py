"""LLaVA-OneVision (SigLIP tower on any-resolution tiles, "full" selection, features packed with unpadding, the
``anyres_max_N`` shrink and newline tokens) fed its REAL processor (built offline: LlavaOnevisionProcessor, its
image and video processors, the word-level tokenizer of ``helpers.vlm_models``; ``save_pretrained`` /
``from_pretrained`` round trip), against an oracle written here: the model's own tower modules with the
explained block's attention probabilities as a grad leaf, the model's own projector and ``pack_image_features``,
the model's own forward with ``mm_encoder_outputs``; tile relevance stitched onto the image in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.llava_onevision.modeling_llava_onevision")

from helpers import vlm_families  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

PINS = [[32, 64], [64, 32], [64, 64]]
TEXT = "<image> what is in the picture ?"
ANSWERS = ["a cat", "two cats red"]


onevision = vlm_families.onevision  # the shared builder (tests/helpers/vlm_families.py)


def _processor(path, aspect: str = "anyres_max_9"):
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    size = {"height": 32, "width": 32}
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=PINS),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=V.tokenizer(), num_image_tokens=V.GRID ** 2,
        vision_feature_select_strategy="full", video_token="w62", vision_aspect_ratio=aspect)
    processor.save_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def _image(hw, seed: int = 0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*hw, 3), dtype=np.uint8))


def _features(model, pixels, size, tiles, block, leaf):
    """Packed features ``[tokens, D]`` of one image from block ``block``'s output (the model's own modules, eager
    attention; that block's probabilities, all tiles, a grad leaf when ``leaf``)."""
    vt = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)
    x = vt.embeddings(pixels[0, :tiles])
    a = None
    for i, layer in enumerate(vt.encoder.layers[: block + 1]):
        h = layer.layer_norm1(x)
        attn = layer.self_attn
        b, n, c = h.shape
        q, k, v = (p(h).reshape(b, n, attn.num_heads, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj,
                                                                                   attn.v_proj))
        probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
        if leaf and i == block:
            probs = a = probs.detach().requires_grad_(True)
        x = x + attn.out_proj((probs @ v).transpose(1, 2).reshape(b, n, c))
        x = x + layer.mlp(layer.layer_norm2(x))
    feats = model.model.multi_modal_projector(x)  # "full": SigLIP has no class token
    packed, _ = model.model.pack_image_features([feats], size, image_newline=model.model.image_newline,
                                                vision_aspect_ratio=model.config.vision_aspect_ratio)
    return packed[0], a


def _oracle(model, inputs, answer, blocks):
    size, pixels, prompt = inputs["image_sizes"], inputs["pixel_values"], inputs["input_ids"][0]
    tiles = int(M.image_size_to_num_patches(size[0].tolist(), PINS, 32))
    rows, cols = M.get_anyres_image_grid_shape(size[0].tolist(), PINS, 32)
    g_ = V.GRID
    total = None
    for blk in blocks:
        with torch.enable_grad():
            feats, a = _features(model, pixels, size, tiles, blk, leaf=True)
            seq = torch.cat([prompt, answer])[None]
            enc = {"image": BaseModelOutputWithPooling(pooler_output=(feats,))}
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq), mm_encoder_outputs=enc).logits.float()
            k = len(prompt)
            score = logits.log_softmax(-1)[0, k - 1: k - 1 + len(answer)].gather(-1, answer[:, None]).sum()
        (g,) = torch.autograd.grad(score, a)
        rel = g.clamp_min(0).mean(dim=(1, 2))  # [tiles, patches]: heads and query rows
        canvas = torch.zeros(rows * g_, cols * g_)
        for r in range(rows):
            for c in range(cols):
                canvas[r * g_:(r + 1) * g_, c * g_:(c + 1) * g_] = rel[1 + r * cols + c].reshape(g_, g_)
        canvas = M.unpad_image(canvas[None], size[0].tolist())[0]  # the model's own crop of its features
        base = F.interpolate(rel[0].reshape(1, 1, g_, g_), size=tuple(canvas.shape), mode="bilinear",
                             align_corners=False)[0, 0]
        total = canvas + base if total is None else total + canvas + base
    return total


def _own_log_prob(model, inputs, answer):
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]).logits
    k = inputs["input_ids"].shape[1]
    return float(logits.float().log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum())


@pytest.mark.parametrize("hw,aspect", [((40, 70), "anyres_max_9"), ((64, 40), "anyres_max_9"),
                                       ((60, 60), "anyres_max_1")])
def test_onevision_real_processor_matches_the_oracle_and_the_models_own_scores(hw, aspect, tmp_path):
    model = onevision(aspect)
    processor = _processor(tmp_path / "onevision", aspect)
    inputs = processor(images=_image(hw), text=TEXT, return_tensors="pt")
    assert inputs["pixel_values"].shape[1] > 1  # tiles
    with torch.no_grad():  # the oracle's tower and packing are the model's own
        tiles = int(M.image_size_to_num_patches(hw, PINS, 32))
        own = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        torch.testing.assert_close(_features(model, inputs["pixel_values"], inputs["image_sizes"], tiles, 1, False)[0],
                                   own)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model, tokenizer=processor)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    for j, text in enumerate(ANSWERS):
        ans = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert abs(float(scores[0, j]) - _own_log_prob(model, inputs, ans)) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, [0, 1])), atol=1e-4, rtol=0)
    assert w.compute_legrad(image=inputs, answers=ANSWERS).shape == (1, 2, *hw)  # the image's own size
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks


def test_onevision_refusals_and_drift(tmp_path, monkeypatch):
    model = onevision()
    blk = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower).encoder.layers[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: (original(*a, **k) * 1.01))
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    processor = _processor(tmp_path / "onevision")
    inputs = processor(images=_image((40, 70)), text=TEXT, return_tensors="pt")
    w = LeWrapper(model, tokenizer=processor)
    with pytest.raises(ValueError, match="image_sizes"):
        w.compute_legrad(image={k: v for k, v in inputs.items() if k != "image_sizes"}, answers=ANSWERS)
    two = processor(images=[[_image((40, 70)), _image((30, 30), 1)]], text="<image> <image> what", return_tensors="pt")
    with pytest.raises(ValueError, match="one image per prompt"):
        w.compute_legrad(image=two, answers=ANSWERS)
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="'full' only"):
        LeWrapper(model, verify=False)
