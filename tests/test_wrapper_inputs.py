"""LeWrapper on open_clip ViT towers: bad and hostile input fails clearly before any work; bounds on size
and memory. (Exactness and integrity: test_wrapper.py.)"""

from __future__ import annotations

import open_clip
import pytest
import torch
from helpers.models import make_tiny_vit, rand_image, unit_text

from legrad import LeWrapper

# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def wrapper():
    return LeWrapper(make_tiny_vit())


@pytest.mark.parametrize(
    "image,text,exc,match",
    [
        (None, unit_text(1), ValueError, "image is required"),
        ([[0.0]], unit_text(1), TypeError, "torch.Tensor"),
        (rand_image(1, 32, 32)[0], unit_text(1), ValueError, "unsqueeze"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), unit_text(1), TypeError, "float"),
        (torch.zeros(1, 1, 32, 32), unit_text(1), ValueError, "channels"),
        (torch.zeros(1, 3, 30, 32), unit_text(1), ValueError, "multiple of the patch size"),
        (torch.zeros(1, 3, 32, 33), unit_text(1), ValueError, "multiple of the patch size"),
        (torch.full((1, 3, 32, 32), float("inf")), unit_text(1), ValueError, "NaN or infinite"),
        (torch.zeros(0, 3, 32, 32), unit_text(1), ValueError, "empty"),
        (rand_image(1, 32, 32), unit_text(1, dim=16), ValueError, "width 16"),
        (rand_image(1, 32, 32), torch.zeros(0, 32), ValueError, "zero prompts"),
        (rand_image(2, 32, 32), unit_text(2, batch=3), ValueError, "B=3"),
        (rand_image(1, 32, 32), unit_text(1)[0], ValueError, r"\[P, D\]"),
        (rand_image(1, 32, 32), "a cat", TypeError, "torch.Tensor"),
        (rand_image(1, 32, 32), torch.ones(1, 32, dtype=torch.long), TypeError, "float"),
        (rand_image(1, 32, 32), torch.full((1, 32), float("nan")), ValueError, "NaN"),
    ],
)
def test_bad_input_raises_clear_error(wrapper, image, text, exc, match):
    with pytest.raises(exc, match=match):
        wrapper.compute_legrad(text, image=image)


def test_bad_layer_index_and_prompt_chunk(wrapper):
    for li in (3, -4, 100):
        with pytest.raises(ValueError, match="out of range"):
            LeWrapper(wrapper.model, layer_index=li)
        with pytest.raises(ValueError, match="out of range"):
            wrapper.compute_legrad(unit_text(1), image=rand_image(1, 32, 32), layer_index=li)
    with pytest.raises(TypeError, match="int"):
        LeWrapper(wrapper.model, layer_index=1.5)
    with pytest.raises(ValueError, match="prompt_chunk"):
        wrapper.compute_legrad(unit_text(1), image=rand_image(1, 32, 32), prompt_chunk=0)


@pytest.mark.parametrize("name", ["RN50", "convnext_base"])
def test_unsupported_tower_raises_type_error(name):

    kwargs = dict(embed_dim=32, text_cfg=dict(width=32, heads=2, layers=1, context_length=8))
    if name == "RN50":
        kwargs["vision_cfg"] = dict(image_size=32, layers=[1, 1, 1, 1], width=8, head_width=8)
    else:
        kwargs["vision_cfg"] = dict(timm_model_name="convnext_atto", timm_model_pretrained=False,
                                    timm_pool="avg", timm_proj="linear", image_size=32)
    model = open_clip.create_model(name, pretrained=None, **kwargs)
    with pytest.raises(TypeError, match="unsupported image tower.*Supported families"):
        LeWrapper(model)


def test_wrong_model_type():
    with pytest.raises(TypeError, match="OpenCLIP model"):
        LeWrapper("ViT-B-16")


def test_output_size_grid_and_explicit():
    model = make_tiny_vit()
    w = LeWrapper(model)
    image, text = rand_image(2, 32, 48), unit_text(3)
    full = w.compute_legrad(text, image=image)
    grid = w.compute_legrad(text, image=image, output_size="grid")
    assert grid.shape == (2, 3, 4, 6)
    flat = grid.flatten(2)
    torch.testing.assert_close(flat.amax(-1), torch.ones(2, 3))
    # the grid maps are the same maps before upsampling: upsample + min-max reproduces the default
    from legrad.engine.maps import min_max, upsample

    torch.testing.assert_close(min_max(upsample(grid, (32, 48))), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.compute_legrad(text, image=image, output_size=(32, 48)), full, atol=0, rtol=0)
    assert w.compute_legrad(text, image=image, output_size=(10, 7)).shape == (2, 3, 10, 7)
    for bad in ("input", (0, 4), (3.0, 4), 5):
        with pytest.raises(ValueError, match="output_size"):
            w.compute_legrad(text, image=image, output_size=bad)


# --------------------------------------------------------------------------- hostile inputs and bounds
def test_overflowing_finite_inputs_raise_instead_of_zero_maps():
    from legrad.engine.relevance import NonFiniteError

    model = make_tiny_vit()
    w = LeWrapper(model)
    with pytest.raises(NonFiniteError, match="overflowed.*normalised"):
        w.compute_legrad(unit_text(2), image=rand_image(1, 32, 32) * 1e20)
    assert issubclass(NonFiniteError, ValueError)
    half = LeWrapper(make_tiny_vit().half())
    with pytest.raises(ValueError, match="overflowed"):
        half.compute_legrad(unit_text(1), image=rand_image(1, 32, 32) * 1e5)
    assert torch.isfinite(half.compute_legrad(unit_text(1), image=rand_image(1, 32, 32))).all()


def test_zero_sized_sub_patch_and_meta_inputs_are_refused_before_work():
    w = LeWrapper(make_tiny_vit())  # patch 8
    text = unit_text(1)
    for h, wd in ((0, 32), (32, 0), (0, 0)):
        with pytest.raises(ValueError, match="zero height or width.*at least one patch \\(8x8"):
            w.compute_legrad(text, image=torch.zeros(1, 3, h, wd))
    with pytest.raises(ValueError, match="smaller than one patch.*at least 8x8") as err:
        w.compute_legrad(text, image=rand_image(1, 4, 4))
    assert "0x0" not in str(err.value)
    with pytest.raises(ValueError, match="crop to 16x8"):
        w.compute_legrad(text, image=rand_image(1, 20, 12))
    with pytest.raises(ValueError, match="image is a meta tensor"):
        w.compute_legrad(text, image=torch.empty(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="text_embedding is a meta tensor"):
        w.compute_legrad(torch.empty(1, 32, device="meta"), image=rand_image(1, 32, 32))
    meta_model = make_tiny_vit().to("meta")
    with pytest.raises(ValueError, match="meta device.*load"):
        LeWrapper(meta_model).compute_legrad(text, image=rand_image(1, 32, 32))


def test_anomaly_mode_gives_the_same_maps():
    model = make_tiny_vit()
    w = LeWrapper(model)
    image, text = rand_image(2, 32, 24), unit_text(3)
    plain = w.compute_legrad(text, image=image)
    with torch.autograd.set_detect_anomaly(True):
        anomalous = w.compute_legrad(text, image=image, prompt_chunk=2)
    torch.testing.assert_close(anomalous, plain, atol=1e-6, rtol=0)


def test_token_limit_and_memory_budget_refuse_before_work(monkeypatch):
    from legrad.engine import budget as memory

    model = make_tiny_vit()
    text = unit_text(2)
    w = LeWrapper(model, max_tokens=16)
    with pytest.raises(ValueError, match="25 patch tokens, more than max_tokens=16.*smaller image size"):
        w.compute_legrad(text, image=rand_image(1, 40, 40))
    assert w.compute_legrad(text, image=rand_image(1, 32, 32)).shape == (1, 2, 32, 32)  # 16 patches: fine
    w.max_tokens = None
    assert w.compute_legrad(text, image=rand_image(1, 40, 40)).shape == (1, 2, 40, 40)

    # Nothing may run once the estimate says no: the tower's steps are never reached.
    def boom(*args, **kwargs):
        raise AssertionError("work started")

    need = memory.estimate_call_bytes(1, 17, w.adapter.width, 2, 32 * 32)
    w = LeWrapper(model, max_memory=need - 1)
    monkeypatch.setattr(type(w.adapter), "steps", boom)
    with pytest.raises(memory.MemoryBudgetError, match="smaller image size.*max_memory=") as err:
        w.compute_legrad(text, image=rand_image(1, 32, 32))
    assert isinstance(err.value, ValueError) and isinstance(err.value, MemoryError)
    monkeypatch.undo()
    assert LeWrapper(model, max_memory=need).compute_legrad(text, image=rand_image(1, 32, 32)).shape[1] == 2
    # Without max_memory, the budget is a share of the memory the device has available.
    monkeypatch.setattr(memory, "available_memory", lambda device: 1000)
    with pytest.raises(memory.MemoryBudgetError, match="80% of the 0 MiB available on cpu"):
        LeWrapper(model).compute_legrad(text, image=rand_image(1, 32, 32))
    monkeypatch.setattr(memory, "available_memory", lambda device: None)  # unknown: not checked
    assert LeWrapper(model).compute_legrad(text, image=rand_image(1, 32, 32)).shape[1] == 2


def test_memory_estimate_grows_linearly_with_tokens_for_large_images():
    from legrad.engine.budget import estimate_call_bytes

    # Demo-model-like tower (width 256) at 512 px / patch 8 (4097 tokens) and 1024 px (16385 tokens), P = 4:
    # the relevance term is capped by the working budget, so 4x the tokens costs ~4x, not 16x.
    small = estimate_call_bytes(1, 4097, 256, 4, 512 * 512)
    large = estimate_call_bytes(1, 16385, 256, 4, 1024 * 1024)
    assert 3 < large / small < 4.5
    assert small < 400 * 2**20  # uncapped, one prompt's [heads, N, N] gradient alone would be 512 MiB
