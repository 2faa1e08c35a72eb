"""``LeWrapper(model, reference="1.1")``: legrad-torch 1.1's maps, checked against slow oracles written here.

The oracles are the original package's definitions, written from its documented behaviour (see
docs/differences.md) with the towers' own modules, explicit attention probabilities as leaves, one
image, prompt and layer at a time, and nothing from ``legrad``:

* SigLIP/SigLIP2 (timm ``map`` pool): the pooler on block l's raw output (no trunk ``norm``), its output
  L2-normalised and dotted with the text; the empty-prompt correction; the summed grid min-max
  normalised, then upsampled (and not normalised again).
* CoCa: ``pooler(block l's output)[:, 0] @ proj`` (no ``ln_post``), dotted with the text without
  normalisation; the gradient on the pooler attention of query 0.

The parity with the original package itself is tests/test_reference_parity.py (a CI step of its own).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import ExplicitLatentPool, block_output, explicit_mha, min_max
from helpers.tiny_towers import build_tiny, random_image, random_text, same_bits

from legrad import LeWrapper
from legrad.adapters.timm import TimmMapReferenceAdapter

TOL = 1e-5


def _finish(grid: torch.Tensor, size, output_size, normalize_on_grid: bool) -> torch.Tensor:
    """``[P, gh, gw]`` summed relevance -> ``[P, h, w]`` maps, in the given order of normalisation."""
    if normalize_on_grid:
        grid = torch.stack([min_max(g) for g in grid])
    if output_size == "grid":
        return grid if normalize_on_grid else torch.stack([min_max(g) for g in grid])
    out = size if output_size is None else output_size
    maps = F.interpolate(grid[None].float(), size=tuple(out), mode="bilinear", align_corners=False)[0]
    return maps if normalize_on_grid else torch.stack([min_max(m) for m in maps])


# ------------------------------------------------------------------------------------------------ SigLIP
def _siglip_grid(trunk, pool: ExplicitLatentPool, img, t: torch.Tensor, start: int) -> torch.Tensor:
    gh, gw = trunk.patch_embed.grid_size
    grid = torch.zeros(gh, gw, dtype=torch.float64)
    for i in range(start, len(trunk.blocks)):
        with torch.no_grad():
            z, _ = block_output(trunk, img, i, leaf_attention=False)  # the block's raw output
        f = F.normalize(pool(z), dim=-1)  # the pooler's output is the embedding: nothing follows it
        (g,) = torch.autograd.grad((f[0] * t).sum(), pool.attn)
        grid += g[0, :, 0].clamp(min=0).mean(0).reshape(gh, gw).double()  # latent row 0, mean over heads
    return grid


def siglip_reference_oracle(model, image, text, layer_index=-2, empty=None, threshold=0.8, output_size=None):
    """legrad-torch 1.1's SigLIP maps ``[B, P, h, w]``, per image, prompt and layer."""
    model = copy.deepcopy(model).eval()
    trunk = model.visual.trunk
    trunk.set_input_size(img_size=tuple(image.shape[-2:]))  # timm's own positions for the grid
    pool = ExplicitLatentPool(trunk.attn_pool)
    start = layer_index % len(trunk.blocks)
    out = []
    for b in range(image.shape[0]):
        img = image[b : b + 1]
        t_b = text[b] if text.ndim == 3 else text
        grid = torch.stack([_siglip_grid(trunk, pool, img, t_b[p], start) for p in range(t_b.shape[0])])
        if empty is not None:
            grid[:, min_max(_siglip_grid(trunk, pool, img, empty, start)) > threshold] = 0
        out.append(_finish(grid, image.shape[-2:], output_size, normalize_on_grid=True))
    return torch.stack(out).float()


@pytest.mark.parametrize("config", ["ViT-B-16-SigLIP", "ViT-B-16-SigLIP2"])
@pytest.mark.parametrize("correction", [True, False])
def test_siglip_reference_matches_oracle(config, correction):
    model = build_tiny(config)
    image, text = random_image(2, 48, 64), random_text(3, 32)
    empty = random_text(1, 32, seed=5)[0]
    wrapper = LeWrapper(model, empty_text_embedding=empty, apply_correction=correction, reference="1.1")
    got = wrapper.compute_legrad_siglip(text, image)
    want = siglip_reference_oracle(model, image, text, empty=empty if correction else None)
    assert got.shape == (2, 3, 48, 64)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # the mode changes the maps (else this test could not tell the two apart)
    default = LeWrapper(model, empty_text_embedding=empty, apply_correction=correction).compute_legrad(text, image)
    assert (default - got).abs().max() > 1e-2


@pytest.mark.parametrize("output_size", ["grid", (20, 28)])
def test_siglip_reference_output_sizes_per_image_text_layer(output_size):
    model = build_tiny("ViT-B-16-SigLIP", seed=3)
    image, text = random_image(2, 48, 48, seed=4), random_text(2, 32, batch=2)
    empty = random_text(1, 32, seed=6)[0]
    wrapper = LeWrapper(model, empty_text_embedding=empty, reference="1.1")
    got = wrapper.compute_legrad(text, image, layer_index=0, output_size=output_size)
    want = siglip_reference_oracle(model, image, text, 0, empty=empty, output_size=output_size)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_siglip_reference_one_forward_whatever_the_prompts(monkeypatch):
    model = build_tiny("ViT-B-16-SigLIP")
    image, text = random_image(2, 48, 48), random_text(5, 32)
    wrapper = LeWrapper(model, empty_text_embedding=random_text(1, 32, seed=5)[0], reference="1.1")
    calls = []
    embed = TimmMapReferenceAdapter._tokens

    def counting(self, *args, **kwargs):
        calls.append(1)
        return embed(self, *args, **kwargs)

    monkeypatch.setattr(TimmMapReferenceAdapter, "_tokens", counting)
    chunked = wrapper.compute_legrad(text, image, prompt_chunk=2)  # 5 prompts + the empty one, 3 backwards
    assert len(calls) == 1
    whole = wrapper.compute_legrad(text, image)
    single = torch.cat([wrapper.compute_legrad(text, image[b : b + 1]) for b in range(2)])
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(single, whole, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ CoCa
def coca_reference_oracle(model, image, text, layer_index=-2):
    """legrad-torch 1.1's CoCa maps ``[B, P, H, W]`` at the tower's native image size."""
    model = copy.deepcopy(model).eval()
    v = model.visual
    pool, blocks = v.attn_pool, v.transformer.resblocks
    start = layer_index % len(blocks)
    gh, gw = v.grid_size
    out = []
    for b in range(image.shape[0]):
        t_b = text[b] if text.ndim == 3 else text
        with torch.no_grad():
            x = v.conv1(image[b : b + 1]).flatten(2).transpose(1, 2)
            x = torch.cat([v.class_embedding.reshape(1, 1, -1), x], dim=1) + v.positional_embedding
            x = v.ln_pre(x)
        grid = torch.zeros(t_b.shape[0], gh, gw, dtype=torch.float64)
        for i in range(len(blocks)):
            with torch.no_grad():
                x = blocks[i](x)
            if i < start:
                continue
            for p in range(t_b.shape[0]):
                attn, out_fn = explicit_mha(pool.attn, pool.ln_q(pool.query)[None], pool.ln_k(x))
                f = out_fn(attn)[:, 0] @ v.proj  # query 0, no ln_post, not normalised
                (g,) = torch.autograd.grad((f[0] * t_b[p]).sum(), attn)
                grid[p] += g[0, :, 0].clamp(min=0).mean(0)[1:].reshape(gh, gw).double()  # CLS column dropped
        out.append(_finish(grid, image.shape[-2:], None, normalize_on_grid=False))
    return torch.stack(out).float()


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
def test_coca_reference_matches_oracle(pool_type):
    model = build_tiny("coca_ViT-B-32", vision_extra={"pool_type": pool_type})
    image, text = random_image(2, 24, 24), random_text(3, 32)
    wrapper = LeWrapper(model, reference="1.1")
    got = wrapper.compute_legrad_coca(text, image)
    torch.testing.assert_close(got, coca_reference_oracle(model, image, text), atol=TOL, rtol=0)
    assert (LeWrapper(model).compute_legrad(text, image) - got).abs().max() > 1e-2
    per_image = wrapper.compute_legrad(text[None].expand(2, -1, -1), image, layer_index=0, prompt_chunk=1)
    torch.testing.assert_close(per_image, coca_reference_oracle(model, image, text, 0), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------ the rest
def test_plain_vit_reference_is_legrad():
    # legrad-torch 1.1 and legrad compute the same maps on CLS/avg-pooled open_clip ViTs (parity test)
    model = build_tiny("ViT-B-32")
    image, text = random_image(2, 24, 24), random_text(3, 32)
    ref = LeWrapper(model, reference="1.1")
    assert ref.reference == "1.1" and LeWrapper(model).reference is None
    assert same_bits(ref.compute_legrad(text, image), LeWrapper(model).compute_legrad(text, image))
    assert LeWrapper(ref).reference == "1.1"  # re-wrapping keeps it


@pytest.mark.parametrize("reference", ["1.0", "2.0", 1.1, "v1.1"])
def test_unknown_reference(reference):
    with pytest.raises(ValueError, match=r"reference must be None .* \['1.1'\]"):
        LeWrapper(build_tiny("ViT-B-32"), reference=reference)


def _hf_siglip():
    pytest.importorskip("transformers")
    from helpers.hf_models import make_model

    return make_model("siglip")


def _timm_map_classifier():
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=32, num_heads=2, num_classes=5, global_pool="map")


@pytest.mark.parametrize("make, why", [
    (lambda: build_tiny("EVA02-B-16"), "never supported by it"),  # timm CLS-pooled tower
    (lambda: build_tiny("PE-Core-B-16"), "never explained this tower: its trunk is timm Eva"),
    (lambda: build_tiny("ViT-B-16-SigLIP", timm_extra={"class_token": True}), "prefix"),
    (_hf_siglip, "never supported by it"),
    (_timm_map_classifier, "never supported by it"),
])
def test_families_the_original_never_supported(make, why):
    model = make()
    with pytest.raises(ValueError, match=why) as info:
        LeWrapper(model, reference="1.1")
    assert "drop reference=" in str(info.value)
    LeWrapper(model)  # legrad itself explains them


def test_scores_with_reference_mode():
    # Where the reference readout is not the model's embedding, scores from it would be wrong: refused.
    image, text = random_image(1, 24, 24), random_text(2, 32)
    coca = build_tiny("coca_ViT-B-32")
    with pytest.raises(ValueError, match="return_scores=True is not available with reference='1.1'"):
        LeWrapper(coca, reference="1.1").compute_legrad(text, image, return_scores=True)
    # Plain ViTs: the reference is legrad itself, so the scores are the model's.
    vit = build_tiny("ViT-B-32")
    out = LeWrapper(vit, reference="1.1").compute_legrad(text, image, return_scores=True)
    expected = F.normalize(vit.encode_image(image), dim=-1)
    torch.testing.assert_close(out.image_features, expected, atol=1e-5, rtol=0)
