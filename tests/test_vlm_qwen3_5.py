"""Qwen3.5 (Qwen3 ViT tower: learned position table resampled to the grid, LayerNorms, attention over the whole image;
merger ``norm`` + ``linear_fc1``/``linear_fc2``; hybrid linear/full-attention language model) against an oracle written
here from the definition: the model's own tower modules run eagerly, the explained block's probabilities from the
model's own ``eager_attention_forward`` as the leaf, the model's own merger and forward with ``mm_encoder_outputs``;
each token's map position from the model's own vision position ids. Qwen3-VL (the same tower with DeepStack) is in
tests/test_vlm_qwen3_vl.py."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

from helpers import qwen_vlm  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.qwen_vlm import processor_inputs, qwen_processor  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402
from transformers.vision_utils import (  # noqa: E402
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

START, END = 60, 61
ANSWERS = [torch.tensor([12, 13]), torch.tensor([15, 16, 17])]
VISION = dict(depth=3, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=48, patch_size=8,
              temporal_patch_size=2, spatial_merge_size=2, in_channels=3, num_position_embeddings=16)


qwen3_5 = qwen_vlm.qwen3_5  # the shared builder (tests/helpers/qwen_vlm.py)


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
    index, weight = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=vis.num_grid_per_side, mode=vis.interpolation_mode,
        align_corners=vis.interpolation_align_corners, spatial_merge_size=2)
    x = vis.patch_embed(inputs["pixel_values"]) + (vis.pos_embed(index) * weight[:, :, None]).sum(1)
    cos, sin = vis.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
    a = None
    last = len(vis.blocks) - 1 if block is None else block
    for i, blk in enumerate(vis.blocks[: last + 1]):
        n = x.shape[0]
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(n, 3, 4, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = M.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, hd]
        _, probs = M.eager_attention_forward(blk.attn, q, k, v, None, blk.attn.scaling)
        if i == block:
            probs = a = probs.detach().requires_grad_(True)
        x = x + blk.attn.proj((probs @ v)[0].transpose(0, 1).reshape(n, -1))
        x = x + blk.mlp(blk.norm2(x))
    return vis.merger(x), a


def _log_prob(model, inputs, answer, feats=None):
    """The model's own teacher-forced log-probability of ``answer``: with ``feats`` as ``mm_encoder_outputs``, else
    from the pixel values."""
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    kw = (dict(pixel_values=inputs["pixel_values"]) if feats is None
          else dict(mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats,))}))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=inputs["image_grid_thw"],
                   mm_token_type_ids=(ids == V.IMAGE_TOKEN).long(), **kw).logits.float()
    k = inputs["input_ids"].shape[1]
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _oracle(model, inputs, answer, blocks):
    _, h, w = inputs["image_grid_thw"][0].tolist()
    pos = get_vision_position_ids(inputs["image_grid_thw"], 2)
    total = torch.zeros(h, w)
    for b in blocks:
        with torch.enable_grad():
            feats, a = _tower(model, inputs, b)
            score = _log_prob(model, inputs, answer, feats)
        (g,) = torch.autograd.grad(score, a)
        total[pos[:, 0], pos[:, 1]] += g.clamp_min(0).mean(dim=(0, 1, 2))  # batch, heads, query rows
    return total


@pytest.mark.parametrize("grid", [(4, 6), (6, 4)])
def test_qwen3_5_matches_the_oracle_in_raster_order_and_leaves_the_model_intact(grid):
    model = qwen3_5()
    inputs = _inputs(grid, [6, 7, 9, 10, 11, 5])
    with torch.no_grad():  # the oracle's tower is the model's own (grounds the oracle)
        own = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        torch.testing.assert_close(_tower(model, inputs, None)[0], own)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, *grid)
    assert model.model.rope_deltas is None
    for j, ans in enumerate(ANSWERS):
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, [1, 2])), atol=1e-4, rtol=0)
        with torch.no_grad():
            assert abs(float(scores[0, j]) - float(_log_prob(model, inputs, ans))) < 1e-4
    every = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, inputs, ANSWERS[0], [0, 1, 2])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks


def test_qwen3_5_changed_block_is_refused(monkeypatch):
    model = qwen3_5()
    blk = model.model.visual.blocks[1]
    original = blk.forward
    # A channel-dependent change (LayerNorms hide a uniform shift or scaling of the last block's output).
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * torch.linspace(0.9, 1.1, 32))
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    LeWrapper(model)


def test_qwen3_5_real_processor_output_is_explained(tmp_path):
    model = qwen3_5(seed=2)
    processor = qwen_processor(tmp_path / "qwen3_5", processor_class="Qwen3VLProcessor",
                               video_processor_class="Qwen3VLVideoProcessor")
    assert type(processor).__name__ == "Qwen3VLProcessor"
    inputs = processor_inputs(processor)
    before = V.snapshot(model)
    w = LeWrapper(model, tokenizer=processor)
    answers = ["a cat", "two cats red"]
    maps, scores = w.compute_legrad(image=inputs, answers=answers, output_size="grid", return_scores=True)
    for j, ans in enumerate(answers):
        ids = torch.tensor(processor.tokenizer(ans, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            assert abs(float(scores[0, j]) - float(_log_prob(model, inputs, ids))) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ids, [1, 2])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
