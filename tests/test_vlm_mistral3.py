"""Mistral 3 (Pixtral tower: 2-D rotary positions from the model's own table, RMSNorm, gated MLP, any image size;
the patch merger and the RMSNorm-MLP projector) fed its REAL processor (built offline: PixtralProcessor,
PixtralImageProcessor with a tiny patch and longest edge, a word-level tokenizer with Pixtral's ``[IMG]``,
``[IMG_BREAK]``, ``[IMG_END]`` tokens; ``save_pretrained`` / ``from_pretrained`` round trip), against an oracle
written here from the definition: the model's own tower modules run eagerly with the explained block's attention
probabilities as a grad leaf (checked against the model's own eager ``attentions``; rotary embedding by the model's
own function), the model's own ``multi_modal_projector``, the model's own forward with ``mm_encoder_outputs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
P = pytest.importorskip("transformers.models.pixtral.modeling_pixtral")
pytest.importorskip("transformers.models.mistral3")
pytest.importorskip("torchvision")  # PixtralProcessor's backend

from helpers import vlm_families as F  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

PATCH, MERGE, EDGE = F.MISTRAL3_PATCH, F.MISTRAL3_MERGE, F.MISTRAL3_EDGE
SPECIAL = F.MISTRAL3_SPECIAL
TEXT = "[IMG] what is in the picture ?"
ANSWERS = ["a cat", "two cats red"]

CONFIGS = F.MISTRAL3_CONFIGS


def _image(seed: int = 0, shape=(40, 96)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8))


def _tower(model, inputs, block: int | None):
    """The image features ``[tokens, D]`` from block ``block``'s output (the last feeding block when None) through
    the model's own projector, that block's attention probabilities as a leaf, and every run block's probabilities
    (to ground the oracle). One image, as the model runs it (``image_sizes`` crops its patch grid)."""
    vt = model.model.vision_tower
    h, w = (int(v) // PATCH for v in inputs["image_sizes"][0])
    layer = model.config.vision_feature_layer
    feeding = len(vt.transformer.layers) + 1 + layer
    last = feeding - 1 if block is None else block
    x = vt.ln_pre(vt.patch_conv(inputs["pixel_values"])[0, :, :h, :w].flatten(1).T[None])
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cos, sin = vt.patch_positional_embedding(x, torch.stack([rows.flatten(), cols.flatten()], -1))
    leaf, every = None, []
    for i, blk in enumerate(vt.transformer.layers[: last + 1]):
        att = blk.attention
        y = blk.attention_norm(x)
        b, n, c = y.shape
        q, k, v = (p(y).reshape(b, n, att.num_heads, -1).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        q, k = P.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        a = (q @ k.transpose(-1, -2) * att.scaling).softmax(-1)
        if i == block:
            a = leaf = a.detach().requires_grad_(True)
        every.append(a)
        x = x + att.o_proj((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + blk.feed_forward(blk.ffn_norm(x))
    feats = model.model.multi_modal_projector(x[0], inputs["image_sizes"])
    return feats, leaf, every


def _log_prob(model, prompt, feats, answer):
    ids = torch.cat([prompt, answer])[None]
    enc = {"image": BaseModelOutputWithPooling(pooler_output=(feats,))}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_encoder_outputs=enc).logits.float()
    k = len(prompt)
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _own_log_prob(model, inputs, answer):
    """The model's own teacher-forced log-probability from pixel values (no legrad, no oracle)."""
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"],
                       image_sizes=inputs["image_sizes"]).logits
    k = inputs["input_ids"].shape[1]
    return float(logits.float().log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum())


def _oracle(model, inputs, answer, blocks):
    h, w = (int(v) // PATCH for v in inputs["image_sizes"][0])
    total = torch.zeros(h * w)
    for b in blocks:
        with torch.enable_grad():
            feats, a, _ = _tower(model, inputs, b)
            score = _log_prob(model, inputs["input_ids"][0], feats, answer)
        (g,) = torch.autograd.grad(score, a)
        total += g.clamp_min(0).mean(dim=(1, 2))[0]  # heads, query rows; no class token
    return total.reshape(h, w)  # the model's raster order (row-major flatten of its patch grid)


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_mistral3_real_processor_matches_the_oracle_and_the_models_own_scores(case, tmp_path):
    model = F.mistral3(case)
    processor = F.mistral3_processor(tmp_path / "mistral3")
    inputs = processor(images=_image(), text=TEXT, return_tensors="pt")
    assert inputs["image_sizes"].tolist() == [[16, 32]]  # 40 x 96 resized to a longest edge of 32: non-square
    gh, gw = 16 // PATCH, 32 // PATCH
    assert int((inputs["input_ids"] == V.IMAGE_TOKEN).sum()) == gh * gw // MERGE ** 2
    assert int((inputs["input_ids"] == SPECIAL["[IMG_BREAK]"]).sum()) == gh // MERGE - 1
    with torch.no_grad():  # the oracle's tower is the model's own (features and eager attention probabilities)
        own = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], output_attentions=True)
        feats, _, probs = _tower(model, inputs, None)
        torch.testing.assert_close(feats, own.pooler_output[0])
        for mine, theirs in zip(probs, own.attentions):
            torch.testing.assert_close(mine, theirs)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model, tokenizer=processor)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, gh, gw)
    spec = CONFIGS[case]
    for j, text in enumerate(ANSWERS):
        ans = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        assert abs(float(scores[0, j]) - _own_log_prob(model, inputs, ans)) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, spec["blocks"])), atol=1e-4, rtol=0)
    every = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    ans = torch.tensor(processor.tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, inputs, ans, spec["every"])), atol=1e-4, rtol=0)
    assert w.compute_legrad(image=inputs, answers=ANSWERS).shape == (1, 2, 16, 32)  # the image the processor saw
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks


def test_mistral3_batch_of_two_sizes_matches_one_by_one_and_the_models_own_scores(tmp_path):
    model = F.mistral3(seed=1)
    processor = F.mistral3_processor(tmp_path / "mistral3")
    imgs, texts = [_image(0), _image(1, (50, 50))], [TEXT, TEXT + " where"]
    w = LeWrapper(model, tokenizer=processor)
    singles = [w.compute_legrad(image=processor(images=i, text=t, return_tensors="pt"), answers=ANSWERS,
                                output_size="grid")[0] for i, t in zip(imgs, texts)]
    both = processor(images=imgs, text=texts, return_tensors="pt", padding=True)
    # 4 x 8 and 8 x 8 patches: the first image's row is padded (key mask), its pixels too (to 32 x 32).
    assert both["image_sizes"].tolist() == [[16, 32], [32, 32]]
    maps, scores = w.compute_legrad(image=both, answers=ANSWERS, output_size="grid", return_scores=True)
    assert isinstance(maps, list) and [tuple(m.shape) for m in maps] == [(2, 4, 8), (2, 8, 8)]
    for got, want in zip(maps, singles):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for b, (i, t) in enumerate(zip(imgs, texts)):  # the padded rows' tower is the model's own on each image
        one = processor(images=i, text=t, return_tensors="pt")
        for j, text in enumerate(ANSWERS):
            ans = torch.tensor(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
            assert abs(float(scores[b, j]) - _own_log_prob(model, one, ans)) < 1e-4


def test_mistral3_padded_row_relevance_is_the_definitions_before_normalisation(tmp_path, monkeypatch):
    """The shorter image of a call (its row padded, key-masked) gets the definition's raw relevance: the mean over
    its own query rows, as the oracle of that image alone (captured before the min-max normalisation)."""
    import legrad.adapters.vlm.base as base

    model = F.mistral3(seed=2)
    processor = F.mistral3_processor(tmp_path / "mistral3")
    imgs, texts = [_image(0), _image(1, (50, 50))], [TEXT, TEXT + " where"]
    seen = []
    monkeypatch.setattr(base, "grid_maps", lambda rel, grids, *a, **k: seen.append((rel.clone(), grids)) or [])
    both = processor(images=imgs, text=texts, return_tensors="pt", padding=True)
    LeWrapper(model, tokenizer=processor).compute_legrad(image=both, answers=ANSWERS[:1])
    (rel, grids), = seen
    assert list(grids) == [(4, 8), (8, 8)]
    one = processor(images=imgs[0], text=texts[0], return_tensors="pt")
    ans = torch.tensor(processor.tokenizer(ANSWERS[0], add_special_tokens=False)["input_ids"])
    torch.testing.assert_close(rel[0, 0, :32].reshape(4, 8), _oracle(model, one, ans, [1, 2]), atol=1e-6, rtol=1e-4)


def test_mistral3_several_images_and_unsupported_configs_are_refused(tmp_path):
    model = F.mistral3()
    processor = F.mistral3_processor(tmp_path / "mistral3")
    w = LeWrapper(model, tokenizer=processor)
    two = processor(images=[[_image(0), _image(1)]], text=["[IMG] [IMG] what is in the picture ?"],
                    return_tensors="pt")
    with pytest.raises(ValueError, match="one image per prompt"):
        w.compute_legrad(image=two, answers=ANSWERS)
    one = processor(images=_image(), text=TEXT, return_tensors="pt")
    with pytest.raises(ValueError, match="image_sizes"):
        w.compute_legrad(image={k: v for k, v in one.items() if k != "image_sizes"}, answers=ANSWERS)
    model.config.vision_feature_layer = [-1, -2]
    with pytest.raises(ValueError, match="vision_feature_layer"):
        LeWrapper(model, verify=False)
    model.config.vision_feature_layer = 0
    with pytest.raises(ValueError, match="selects no block output"):
        LeWrapper(model, verify=False)


def test_mistral3_changed_block_is_refused(monkeypatch):
    model = F.mistral3()
    blk = model.model.vision_tower.transformer.layers[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * 1.01)
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    LeWrapper(model)


def test_mistral3_explain_answer_generates_with_image_sizes_and_scores_its_own_answer(tmp_path):
    model = F.mistral3(seed=3)
    processor = F.mistral3_processor(tmp_path / "mistral3")
    inputs = processor(images=_image(), text=TEXT, return_tensors="pt")
    before = V.snapshot(model)
    r = LeWrapper(model, tokenizer=processor).explain_answer(inputs, max_new_tokens=3, output_size="grid",
                                                             suppress_tokens=[V.IMAGE_TOKEN])
    assert r.maps.shape == (1, 3, 16 // PATCH, 32 // PATCH)
    assert abs(float(r.answer_logprob[0]) - _own_log_prob(model, inputs, r.token_ids[0])) < 1e-4
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
