"""LLaVA-NeXT (any-resolution tiles) against an independent oracle: the model's own tower and feature packing,
one block, one image and one answer per backward, tile relevance stitched onto the image in the test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from helpers.oracles import min_max  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402

M = pytest.importorskip("transformers.models.llava_next.modeling_llava_next")
ANSWERS = [torch.tensor([12, 13]), torch.tensor([15, 16, 17])]


def _features(model, pixels, size, tiles, block, leaf):
    """Packed features ``[tokens, D]`` of one image from block ``block``'s output; the attention of that block
    (all tiles) is a grad leaf when ``leaf``."""
    vt = model.model.vision_tower
    x = vt.pre_layrnorm(vt.embeddings(pixels[0, :tiles]))
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
    feats = model.model.multi_modal_projector(x[:, 1:])
    packed, _ = model.model.pack_image_features([feats], size, "default", image_newline=model.model.image_newline)
    return packed[0], a


def _oracle(model, pixels, size, prompt, answer, blocks):
    tiles = int(M.image_size_to_num_patches(size[0].tolist(), model.config.image_grid_pinpoints, 32))
    rows, cols = M.get_anyres_image_grid_shape(size[0].tolist(), model.config.image_grid_pinpoints, 32)
    assert tiles == rows * cols + 1
    total = None
    for blk in blocks:
        with torch.enable_grad():
            feats, a = _features(model, pixels, size, tiles, blk, leaf=True)
            seq = torch.cat([prompt, answer])[None]
            embeds = model.get_input_embeddings()(torch.where(seq == V.IMAGE_TOKEN, 0, seq)).detach()
            embeds = embeds.masked_scatter((seq == V.IMAGE_TOKEN)[..., None], feats)
            logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(seq)).logits.float()
            k = len(prompt)
            score = logits.log_softmax(-1)[0, k - 1: k - 1 + len(answer)].gather(-1, answer[:, None]).sum()
        (g,) = torch.autograd.grad(score, a)
        rel = g.clamp_min(0).mean(dim=(1, 2))[:, 1:]  # [tiles, patches]
        canvas = torch.zeros(rows * V.GRID, cols * V.GRID)
        for r in range(rows):
            for c in range(cols):
                canvas[r * V.GRID:(r + 1) * V.GRID, c * V.GRID:(c + 1) * V.GRID] = rel[1 + r * cols + c].reshape(
                    V.GRID, V.GRID)
        canvas = M.unpad_image(canvas[None], size[0].tolist())[0]  # the model's own crop of its features
        base = F.interpolate(rel[0].reshape(1, 1, V.GRID, V.GRID), size=tuple(canvas.shape), mode="bilinear",
                             align_corners=False)[0, 0]
        total = canvas + base if total is None else total + canvas + base
    return total


@pytest.mark.parametrize("hw", [(30, 60), (64, 40)])
def test_llava_next_tiles_stitched_match_the_oracle_and_leave_the_model_intact(hw):
    model = V.llava_next()
    size = torch.tensor([hw])
    pixels = torch.randn(1, V.ANYRES_TILES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tiles = int(M.image_size_to_num_patches(hw, model.config.image_grid_pinpoints, 32))
    with torch.no_grad():
        n_img = _features(model, pixels, size, tiles, 1, leaf=False)[0].shape[0]
        # The oracle's tower and packing reproduce the model's own image features (grounds the oracle).
        own = model.model.get_image_features(pixels, size).pooler_output[0]
        torch.testing.assert_close(_features(model, pixels, size, tiles, 1, leaf=False)[0], own)
    prompt = V.prompt([4, 6, 7, 8, 9, 10, 11, 5], n_img)
    inputs = {**V.batch([prompt], pixels), "image_sizes": size}
    before = V.snapshot(model)
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS, output_size="grid")
    for j, ans in enumerate(ANSWERS):
        ref = min_max(_oracle(model, pixels, size, prompt, ans, [0, 1]))
        assert maps.shape[-2:] == ref.shape
        torch.testing.assert_close(maps[0, j], ref, atol=1e-4, rtol=0)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
    full = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS)
    assert full.shape == (1, 2, *hw)  # the image's own size


def test_llava_next_batch_of_two_sizes_returns_one_map_per_image():
    model = V.llava_next(seed=1)
    sizes = torch.tensor([[30, 60], [32, 32]])
    pixels = torch.randn(2, V.ANYRES_TILES, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = []
    for b in range(2):
        tiles = int(M.image_size_to_num_patches(sizes[b].tolist(), model.config.image_grid_pinpoints, 32))
        with torch.no_grad():
            n_img = _features(model, pixels[b:b + 1], sizes[b:b + 1], tiles, 1, leaf=False)[0].shape[0]
        prompts.append(V.prompt([4, 6, 5] if b else [4, 19, 7, 13, 11, 5], n_img))
    inputs = {**V.batch(prompts, pixels, side="left"), "image_sizes": sizes}
    maps = LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS, output_size="grid")
    assert isinstance(maps, list) and len(maps) == 2
    for b in range(2):
        for j, ans in enumerate(ANSWERS):
            ref = min_max(_oracle(model, pixels[b:b + 1], sizes[b:b + 1], prompts[b], ans, [0, 1]))
            torch.testing.assert_close(maps[b][j], ref, atol=1e-4, rtol=0)


def test_llava_next_without_image_sizes_is_refused():
    model = V.llava_next()
    inputs = V.batch([V.prompt([4, 5], 10)], torch.randn(1, V.ANYRES_TILES, 3, 32, 32))
    with pytest.raises(ValueError, match="image_sizes"):
        LeWrapper(model).compute_legrad(image=inputs, answers=ANSWERS)
