"""Qwen3-VL (Qwen3 ViT tower with DeepStack: intermediate blocks' outputs, through their own mergers, added to the
first decoder layers' hidden states) against an oracle written here from the definition and legrad's documented
choice for DeepStack: the score of explained block ``b`` is the model's with its tower cut after block ``b``: the merger
and every DeepStack tap at or after ``b`` read block ``b``'s output, taps before ``b`` their own blocks' outputs. The
model's own tower modules run eagerly (the explained block's probabilities from the model's own
``eager_attention_forward`` as the leaf), its own mergers, its own forward with ``mm_encoder_outputs`` carrying
``pooler_output`` and ``deepstack_features``."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
M = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")

from helpers import qwen_vlm  # noqa: E402
from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.qwen_vlm import processor_inputs, qwen_processor  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402
from transformers.vision_utils import (  # noqa: E402
    get_vision_interpolation_indices_and_weights,
    get_vision_position_ids,
)

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

START, END = 60, 61
ANSWERS = [torch.tensor([12, 13]), torch.tensor([15, 16, 17])]
TAPS = [0, 2]  # deepstack_visual_indexes


qwen3_vl = qwen_vlm.qwen3_vl  # the shared builder (tests/helpers/qwen_vlm.py)


def _inputs(grid: tuple[int, int], words: list[int], seed: int = 0):
    h, w = grid
    pixels = torch.randn(h * w, 3 * 2 * 64, generator=torch.Generator().manual_seed(seed))
    ids = torch.tensor([[1, START] + [V.IMAGE_TOKEN] * (h * w // 4) + [END] + words])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_grid_thw": torch.tensor([[1, h, w]]), "mm_token_type_ids": (ids == V.IMAGE_TOKEN).long()}


def _tower(model, inputs, block: int | None):
    """``(merger features, [DeepStack features], probabilities of block)`` with the tower cut after ``block`` (the
    whole tower when None)."""
    vis = model.model.visual
    grid = inputs["image_grid_thw"]
    index, weight = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=vis.num_grid_per_side, mode=vis.interpolation_mode,
        align_corners=vis.interpolation_align_corners, spatial_merge_size=2)
    x = vis.patch_embed(inputs["pixel_values"]) + (vis.pos_embed(index) * weight[:, :, None]).sum(1)
    cos, sin = vis.rotary_pos_emb(x, get_vision_position_ids(grid, 2))
    a = None
    last = len(vis.blocks) - 1 if block is None else block
    outputs = []
    for i, blk in enumerate(vis.blocks[: last + 1]):
        n = x.shape[0]
        q, k, v = blk.attn.qkv(blk.norm1(x)).reshape(n, 3, 4, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = M.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        _, probs = M.eager_attention_forward(blk.attn, q, k, v, None, blk.attn.scaling)
        if i == block:
            probs = a = probs.detach().requires_grad_(True)
        x = x + blk.attn.proj((probs @ v)[0].transpose(0, 1).reshape(n, -1))
        x = x + blk.mlp(blk.norm2(x))
        outputs.append(x)
    deep = [m(outputs[min(d, last)]) for d, m in zip(TAPS, vis.deepstack_merger_list)]  # taps after the cut: x_last
    return vis.merger(x), deep, a


def _log_prob(model, inputs, answer, feats=None):
    """The model's own teacher-forced log-probability of ``answer``: with ``feats`` (merger, DeepStack) as
    ``mm_encoder_outputs``, else from the pixel values."""
    ids = torch.cat([inputs["input_ids"][0], answer])[None]
    if feats is None:
        kw = dict(pixel_values=inputs["pixel_values"])
    else:
        out = M.BaseModelOutputWithDeepstackFeatures(pooler_output=(feats[0],), deepstack_features=[(d,) for d in feats[1]])
        kw = dict(mm_encoder_outputs={"image": out})
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
            main, deep, a = _tower(model, inputs, b)
            score = _log_prob(model, inputs, answer, (main, deep))
        (g,) = torch.autograd.grad(score, a)
        total[pos[:, 0], pos[:, 1]] += g.clamp_min(0).mean(dim=(0, 1, 2))
    return total


@pytest.mark.parametrize("grid", [(4, 6), (6, 4)])
def test_qwen3_vl_matches_the_deepstack_oracle_in_raster_order_and_leaves_the_model_intact(grid):
    model = qwen3_vl()
    inputs = _inputs(grid, [6, 7, 9, 10, 11, 5])
    with torch.no_grad():  # the oracle's tower is the model's own, DeepStack included (grounds the oracle)
        own = model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        main, deep, _ = _tower(model, inputs, None)
        torch.testing.assert_close(main, own.pooler_output[0])
        for d, o in zip(deep, own.deepstack_features):
            torch.testing.assert_close(d, o[0])
    before, hooks = V.snapshot(model), V.hooks(model)
    w = LeWrapper(model)
    maps, scores = w.compute_legrad(image=inputs, answers=ANSWERS, output_size="grid", return_scores=True)
    assert maps.shape == (1, 2, *grid)
    assert model.model.rope_deltas is None  # legrad never lets the forward cache it (the oracle's forward does)
    for j, ans in enumerate(ANSWERS):
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ans, [2, 3])), atol=1e-4, rtol=0)
        with torch.no_grad():
            assert abs(float(scores[0, j]) - float(_log_prob(model, inputs, ans))) < 1e-4
    # Every block: block 0 feeds both taps and the merger, block 1 the second tap and the merger.
    every = w.compute_legrad(image=inputs, answers=ANSWERS[:1], output_size="grid", layer_index=0)
    torch.testing.assert_close(every[0, 0], min_max(_oracle(model, inputs, ANSWERS[0], [0, 1, 2, 3])), atol=1e-4,
                               rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items()) and V.hooks(model) == hooks
    with torch.no_grad():  # DeepStack matters here: without it the answer's log-prob changes
        with_deep = _log_prob(model, inputs, ANSWERS[0], (main, deep))
        without = _log_prob(model, inputs, ANSWERS[0], (main, [torch.zeros_like(d) for d in deep]))
    assert abs(float(with_deep - without)) > 1e-3


def test_qwen3_vl_changed_block_or_deepstack_merger_is_refused(monkeypatch):
    model = qwen3_vl()
    blk = model.model.visual.blocks[1]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *a, **k: original(*a, **k) * torch.linspace(0.9, 1.1, 32))
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    merger = model.model.visual.deepstack_merger_list[0]
    original_merger = merger.forward
    monkeypatch.setattr(merger, "forward", lambda x: original_merger(x) * 1.1)  # only the DeepStack output changes
    with pytest.raises(DriftError, match="differs from the model's own forward"):
        LeWrapper(model)
    monkeypatch.undo()
    LeWrapper(model)


def test_qwen3_vl_real_processor_output_is_explained(tmp_path):
    model = qwen3_vl(seed=2)
    processor = qwen_processor(tmp_path / "qwen3_vl", processor_class="Qwen3VLProcessor",
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
        torch.testing.assert_close(maps[0, j], min_max(_oracle(model, inputs, ids, [2, 3])), atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())


def test_qwen3_vl_batch_of_two_images_matches_one_by_one():
    model = qwen3_vl(seed=1)
    one = [_inputs((4, 4), [6, 7, 5], seed=s) for s in (0, 1)]
    w = LeWrapper(model)
    singles = torch.cat([w.compute_legrad(image=x, answers=ANSWERS, output_size="grid", layer_index=0) for x in one])
    both = {"input_ids": torch.cat([x["input_ids"] for x in one]),
            "attention_mask": torch.ones(2, one[0]["input_ids"].shape[1], dtype=torch.long),
            "pixel_values": torch.cat([x["pixel_values"] for x in one]),
            "image_grid_thw": torch.cat([x["image_grid_thw"] for x in one])}
    got = w.compute_legrad(image=both, answers=ANSWERS, output_size="grid", layer_index=0, prompt_chunk=3)
    torch.testing.assert_close(got, singles, atol=1e-5, rtol=0)


def test_qwen3_vl_calls_from_two_threads_match_calls_one_after_the_other():
    # The DeepStack feature path keeps per-call scratch (which block is explained, the taps' outputs): two
    # threads explaining different images on one wrapper must not see each other's.
    import threading

    model = qwen3_vl(seed=2)
    one = [_inputs((4, 4), [6, 7, 5], seed=s) for s in (0, 1)]
    w = LeWrapper(model)
    want = [w.compute_legrad(image=x, answers=ANSWERS, output_size="grid", layer_index=0) for x in one]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(k: int) -> None:
        start.wait()
        for _ in range(3):
            got[k].append(w.compute_legrad(image=one[k], answers=ANSWERS, output_size="grid", layer_index=0))

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        assert len(got[k]) == 3
        for m in got[k]:
            torch.testing.assert_close(m, want[k], atol=1e-5, rtol=0)
