"""Qwen2.5-VL (Qwen2.5 ViT tower: RMSNorms, gated MLPs, window attention outside ``fullatt_block_indexes``) against
an oracle written here from the definition, the model's own way: tokens permuted window by window
(``permute_input_for_window_attn``), each window's probabilities from the model's own ``eager_attention_forward``
over that window (its ``cu_window_seqlens``), assembled into the full ``N x N`` matrix ``A_b`` with zeros outside
the windows (the explained block's leaf: the relevance's mean is over all ``N`` query rows), the model's own merger
and inverse permutation, the model's own forward with ``mm_encoder_outputs``; each key's map position from the
window index and the model's own vision position ids (not from legrad's window masks)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl")

from helpers import qwen_vlm  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.qwen_vlm import processor_inputs, qwen_processor  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

START, END = 60, 61
ANSWERS = [torch.tensor([12, 13]), torch.tensor([15, 16, 17])]
FULL = [1, 3]  # fullatt_block_indexes: blocks 0 and 2 attend within windows


qwen2_5_vl = qwen_vlm.qwen2_5_vl  # the shared builder (tests/helpers/qwen_vlm.py)


def _inputs(grid: tuple[int, int], words: list[int], seed: int = 0):
    h, w = grid
    pixels = torch.randn(h * w, 3 * 2 * 64, generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor([[1, START] + [V.IMAGE_TOKEN] * (h * w // 4) + [END] + words])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, h, w]]), "mm_token_type_ids": (ids == V.IMAGE_TOKEN).long()}


def _windows(vis, grid):
    index, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=vis.window_size,
                                        patch_size=vis.patch_size)
    return index, cu


def _tower(model, inputs, block: int | None):
    """Merged features (processor order) from block ``block``'s output (the last block when None), the full
    ``N x N`` probabilities of that block (a leaf, window order) and the window index."""
    vis = model.model.visual
    grid = inputs["image_grid_thw"]
    index, cu_win = _windows(vis, grid)
    x = vis.patch_embed(inputs["pixel_values"])
    n = x.shape[0]
    x = vis.permute_input_for_window_attn(x, index, n)
    cos, sin = (vis.permute_input_for_window_attn(t, index, n)
                for t in vis.rotary_pos_emb(x, get_vision_position_ids(grid, 2)))
    a = None
    last = len(vis.blocks) - 1 if block is None else block
    for i, blk in enumerate(vis.blocks[: last + 1]):
        h = blk.norm1(x)
        q, k, v = blk.attn.qkv(h).reshape(n, 3, 4, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = M.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, N, hd]
        bounds = [0, n] if i in FULL else cu_win.tolist()
        probs = torch.zeros(1, 4, n, n)
        for lo, hi in zip(bounds[:-1], bounds[1:]):  # the model's own eager probabilities, window by window
            _, w = M.eager_attention_forward(blk.attn, q[..., lo:hi, :], k[..., lo:hi, :], v[..., lo:hi, :], None,
                                             blk.attn.scaling)
            probs[..., lo:hi, lo:hi] = w
        if i == block:
            probs = a = probs.detach().requires_grad_(True)
        x = x + blk.attn.proj((probs @ v)[0].transpose(0, 1).reshape(n, -1))
        x = x + blk.mlp(blk.norm2(x))
    return vis.merger(x)[torch.argsort(index)], a, index


def _log_prob(model, inputs, feats, answer):
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), image_grid_thw=inputs["image_grid_thw"],
                   mm_token_type_ids=(ids == V.IMAGE_TOKEN).long(),
                   mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=(feats,))}).logits.float()
    k = inputs["input_ids"].shape[1]
    return logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum()


def _own_log_prob(model, inputs, answer) -> float:
    """The model's own teacher-forced log-probability of ``answer`` (its forward from pixel values)."""
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                       mm_token_type_ids=(ids == V.IMAGE_TOKEN).long()).logits
    k = inputs["input_ids"].shape[1]
    return float(logits.log_softmax(-1)[0, k - 1: ids.shape[1] - 1].gather(-1, answer[:, None]).sum())


def _oracle(model, inputs, answer, blocks):
    _, h, w = inputs["image_grid_thw"][0].tolist()
    pos = get_vision_position_ids(inputs["image_grid_thw"], 2)  # each token's (row, col), processor order
    total = torch.zeros(h, w)
    for b in blocks:
        with torch.enable_grad():
            feats, a, index = _tower(model, inputs, b)
            score = _log_prob(model, inputs, feats, answer)
        (g,) = torch.autograd.grad(score, a)
        rel = g.clamp_min(0).mean(dim=(0, 1, 2))  # batch, heads, ALL N query rows
        # Window order position j*4+u holds the processor's token index[j]*4+u.
        token = (index[:, None] * 4 + torch.arange(4)).reshape(-1)
        total[pos[token, 0], pos[token, 1]] += rel
    return total


@pytest.mark.parametrize("grid", [(6, 8), (8, 6)])
def test_qwen2_5_vl_matches_the_oracle_in_raster_order_and_leaves_the_model_intact(grid):
    model = qwen2_5_vl()
    inputs = _inputs(grid, [6, 7, 9, 10, 11, 5])
    index, cu = _windows(model.model.visual, inputs["image_grid_thw"])
    assert len(cu) - 1 == 4 and len(set((cu[1:] - cu[:-1]).tolist())) > 1  # 4 windows of unequal sizes
    with torch.no_grad():  # the oracle's tower is the model's own (grounds the oracle)
        own = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
        torch.testing.assert_close(_tower(model, inputs, None)[0], own)
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, *grid)
    assert model.model.rope_deltas is None
    for j, ans in enumerate(ANSWERS):
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, [2, 3])), atol=1e-4, rtol=0)
        assert abs(float(scores[0, j]) - _own_log_prob(model, inputs, ans)) < 1e-4
    every = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, inputs, ANSWERS[0], [0, 1, 2, 3])), atol=1e-4,
                               rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks
    assert w.compute_legrad(image=inputs, answers=ANSWERS).shape == (1, 2, grid[0] * 8, grid[1] * 8)


def test_qwen2_5_vl_batch_of_two_images_matches_one_by_one_and_the_oracle():
    model = qwen2_5_vl(seed=3)
    one = [_inputs((6, 8), [6, 7, 5], seed=s) for s in (0, 1)]
    w = LeWrapper(model)
    singles = torch.cat([w.compute_legrad(image=x, answers=ANSWERS, output_size="grid", layer_index=-3) for x in one])
    both = {"input_ids": torch.cat([x["input_ids"] for x in one]),
            "attention_mask": torch.ones(2, one[0]["input_ids"].shape[1], dtype=torch.long),
            "pixel_values": torch.cat([x["pixel_values"] for x in one]),
            "image_grid_thw": torch.cat([x["image_grid_thw"] for x in one])}
    got = w.compute_legrad(image=both, answers=ANSWERS, output_size="grid", layer_index=-3)
    torch.testing.assert_close(got, singles, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1, 1], min_max(_oracle(model, one[1], ANSWERS[1], [1, 2, 3])), atol=1e-4, rtol=0)


def test_qwen2_5_vl_changed_block_is_refused(monkeypatch):
    model = qwen2_5_vl()
    for b in (0, 3):  # a windowed block and a full-attention one (a shift: the merger's RMSNorm hides a scaling)
        blk = model.model.visual.blocks[b]
        original = blk.forward
        monkeypatch.setattr(blk, "forward", lambda *a, _f=original, **k: _f(*a, **k) + 0.05)
        with pytest.raises(DriftError, match="differs from the model's own forward"):
            LeWrapper(model)
        monkeypatch.undo()
    LeWrapper(model)


def test_qwen2_5_vl_real_processor_output_is_explained(tmp_path):
    model = qwen2_5_vl(seed=2)
    processor = qwen_processor(tmp_path / "qwen2_5_vl", processor_class="Qwen2_5_VLProcessor")
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    inputs = processor_inputs(processor, size=(52, 60))
    grid = tuple(inputs["image_grid_thw"][0, 1:].tolist())
    assert grid == (6, 8)  # several windows
    before = V.snapshot(model)
    w = LeWrapper(model, tokenizer=processor)
    answers = ["a cat", "two cats red"]
    maps, scores = w.compute_legrad(image=inputs, answers=answers, output_size="grid", return_scores=True)
    for j, ans in enumerate(answers):
        ids = torch.tensor(processor.tokenizer(ans, add_special_tokens=False)["input_ids"])
        assert abs(float(scores[0, j]) - _own_log_prob(model, inputs, ids)) < 1e-4
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ids, [2, 3])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
