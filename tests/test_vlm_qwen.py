"""Qwen2-VL (Qwen ViT tower: 2-D rotary positions, 2 x 2 patch merger, tokens in merge-window order) against an
oracle written here from the definition: the model's own tower modules run eagerly with the attention
probabilities of the explained block as a grad leaf (rotary embedding by the model's own function), the model's
own merger, the model's own forward with ``mm_encoder_outputs``; each token's map position taken from the model's
own vision position ids (not from legrad's reordering)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")

from helpers import qwen_vlm  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.qwen_vlm import processor_inputs, qwen_processor  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402
from transformers.vision_utils import get_vision_position_ids  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

START, END = 60, 61
ANSWERS = [torch.tensor([12, 13]), torch.tensor([15, 16, 17])]


qwen2_vl = qwen_vlm.qwen2_vl  # the shared builder (tests/helpers/qwen_vlm.py)


def _inputs(grid: tuple[int, int], words: list[int], seed: int = 0):
    h, w = grid
    pixels = torch.randn(h * w, 3 * 2 * 64, generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor([[1, START] + [V.IMAGE_TOKEN] * (h * w // 4) + [END] + words])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, h, w]]), "mm_token_type_ids": (ids == V.IMAGE_TOKEN).long()}


def _tower(model, inputs, block: int | None):
    """Merged features from block ``block``'s output (the last block when None) and that block's probabilities."""
    vis = model.model.visual
    grid = inputs["image_grid_thw"]
    x = vis.patch_embed(inputs["pixel_values"])
    cos, sin = vis.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
    a = None
    last = len(vis.blocks) - 1 if block is None else block
    for i, blk in enumerate(vis.blocks[: last + 1]):
        h = blk.norm1(x)
        n = h.shape[0]
        q, k, v = blk.attn.qkv(h).reshape(n, 3, 4, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = M.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, N, hd]
        probs = (q @ k.transpose(-1, -2) * blk.attn.scaling).softmax(-1)
        if i == block:
            probs = a = probs.detach().requires_grad_(True)
        x = x + blk.attn.proj((probs @ v).transpose(0, 1).reshape(n, -1))
        x = x + blk.mlp(blk.norm2(x))
    return vis.merger(x), a


def _log_prob(model, inputs, feats, answer):
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=inputs["image_grid_thw"],
                   mm_token_type_ids=(ids == V.IMAGE_TOKEN).long(),
                   mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats,))}).logits.float()
    k = inputs["input_ids"].shape[1]
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _oracle(model, inputs, answer, blocks):
    _, h, w = inputs["image_grid_thw"][0].tolist()
    pos = get_vision_position_ids(inputs["image_grid_thw"], 2)  # each token's (row, col) on the patch grid
    total = torch.zeros(h, w)
    for b in blocks:
        with torch.enable_grad():
            feats, a = _tower(model, inputs, b)
            score = _log_prob(model, inputs, feats, answer)
        (g,) = torch.autograd.grad(score, a)
        rel = g.clamp_min(0).mean(dim=(0, 1))  # heads, query rows
        total[pos[:, 0], pos[:, 1]] += rel
    return total


@pytest.mark.parametrize("grid", [(4, 6), (6, 4)])
def test_qwen2_vl_matches_the_oracle_in_raster_order_and_leaves_the_model_intact(grid):
    model = qwen2_vl()
    inputs = _inputs(grid, [6, 7, 9, 10, 11, 5])
    with torch.no_grad():  # the oracle's tower is the model's own (grounds the oracle)
        own = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        torch.testing.assert_close(_tower(model, inputs, None)[0], own)
    before, hooks = V.snapshot(model), V.hooks(model)
    assert model.model.rope_deltas is None
    w = LeWrapper(model)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, *grid)
    assert model.model.rope_deltas is None  # the forward's rope cache is never written (the oracle's forward does)
    for j, ans in enumerate(ANSWERS):
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, [1, 2])), atol=1e-4, rtol=0)
        # The scores are the model's own teacher-forced log-probabilities (its forward from pixel values).
        ids = torch.cat([inputs["input_ids"][0], ans])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                           mm_token_type_ids=(ids == V.IMAGE_TOKEN).long()).logits
        k = inputs["input_ids"].shape[1]
        own = logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, ans[:, None]).sum()
        assert abs(float(scores[0, j]) - float(own)) < 1e-4
    every = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, inputs, ANSWERS[0], [0, 1, 2])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks
    full = w.compute_legrad(image=inputs, answers=ANSWERS)
    assert full.shape == (1, 2, grid[0] * 8, grid[1] * 8)  # the image the processor saw


def test_qwen2_vl_batch_of_two_images_matches_one_by_one():
    model = qwen2_vl(seed=1)
    one = [_inputs((4, 4), [6, 7, 5], seed=s) for s in (0, 1)]
    w = LeWrapper(model)
    singles = torch.cat([w.compute_legrad(image=x, answers=ANSWERS, output_size="grid") for x in one])
    both = {"input_ids": torch.cat([x["input_ids"] for x in one]), "attention_mask": torch.ones(2, one[0]["input_ids"].shape[1]),
            "pixel_values": torch.cat([x["pixel_values"] for x in one]),
            "image_grid_thw": torch.cat([x["image_grid_thw"] for x in one])}
    torch.testing.assert_close(w.compute_legrad(image=both, answers=ANSWERS, output_size="grid"), singles,
                               atol=1e-5, rtol=0)


def test_qwen2_vl_changed_block_is_refused_and_bad_calls_are_named(monkeypatch):
    model = qwen2_vl()
    blk = model.model.visual.blocks[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * 1.01)
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    w = LeWrapper(model)
    inputs = _inputs((4, 4), [6, 5])
    with pytest.raises(ValueError, match="image_grid_thw"):
        w.compute_legrad(image={k: v for k, v in inputs.items() if k != "image_grid_thw"}, answers=ANSWERS)
    with pytest.raises(ValueError, match="video"):
        w.compute_legrad(image={**inputs, "image_grid_thw": torch.tensor([[2, 4, 4]])}, answers=ANSWERS)


def test_qwen2_vl_real_processor_output_is_explained(tmp_path):
    model = qwen2_vl(seed=2)
    processor = qwen_processor(tmp_path / "qwen2_vl")
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")
    inputs = processor_inputs(processor)
    assert set(inputs) >= {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"}
    grid = tuple(inputs["image_grid_thw"][0, 1:].tolist())
    before = V.snapshot(model)
    w = LeWrapper(model, tokenizer=processor)
    answers = ["a cat", "two cats red"]
    maps, scores = w.compute_legrad(image=inputs, answers=answers, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, *grid)
    for j, ans in enumerate(answers):
        ids = torch.tensor(processor.tokenizer(ans, add_special_tokens=False)["input_ids"])
        full = torch.cat([inputs["input_ids"][0], ids])[None]
        with torch.no_grad():
            logits = model(input_ids=full, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                           mm_token_type_ids=(full == V.IMAGE_TOKEN).long()).logits
        k = inputs["input_ids"].shape[1]
        own = logits.log_softmax(-1)[0, k - 1: full.shape[1] - 1].gather(-1, ids[:, None]).sum()
        assert abs(float(scores[0, j]) - float(own)) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ids, [1, 2])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
