"""LeWrapper on open_clip ViT towers: exactness against the slow oracle, invariances, model integrity."""

from __future__ import annotations

import copy
import threading

import open_clip
import pytest
import torch
from helpers.models import TINY_VITS, make_tiny_vit, rand_image, unit_text
from helpers.oracles import openclip_vit_oracle
from helpers.tiny_towers import same_bits

from legrad import LeWrapper

KINDS = list(TINY_VITS)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "size,layer_index,p",
    [((32, 32), -2, 3), ((32, 48), -1, 1), ((64, 64), 0, 2), ((48, 32), -3, 5)],
)
def test_matches_oracle(kind, size, layer_index, p):
    model = make_tiny_vit(kind)
    ps = model.visual.patch_size[0]
    h, w = (size[0] // 8) * ps, (size[1] // 8) * ps  # same grids whatever the patch size
    depth = len(model.visual.transformer.resblocks)
    layer_index = max(layer_index, -depth)
    image = rand_image(2, h, w)
    text = unit_text(p)
    maps = LeWrapper(model, layer_index=layer_index).compute_legrad(text, image=image)
    expected = openclip_vit_oracle(model, image, text, layer_index)
    assert maps.shape == (2, p, h, w)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)


def test_matches_oracle_per_image_prompts():
    model = make_tiny_vit()
    image = rand_image(3, 32, 40)
    text = unit_text(2, batch=3)
    maps = LeWrapper(model).compute_legrad(text, image=image)
    torch.testing.assert_close(maps, openclip_vit_oracle(model, image, text, -2), atol=1e-5, rtol=0)


def test_float64_model_matches_oracle_tightly():
    model = make_tiny_vit().double()
    image = rand_image(1, 40, 32).double()
    text = unit_text(3).double()
    maps = LeWrapper(model, layer_index=0).compute_legrad(text, image=image)
    assert maps.dtype == torch.float32
    torch.testing.assert_close(maps, openclip_vit_oracle(model, image, text, 0), atol=1e-6, rtol=0)


def test_output_range_and_minmax():
    model = make_tiny_vit()
    maps = LeWrapper(model).compute_legrad(unit_text(4), image=rand_image(2, 32, 32))
    flat = maps.flatten(2)
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(flat.min(-1).values, torch.zeros(2, 4))
    torch.testing.assert_close(flat.max(-1).values, torch.ones(2, 4))


def test_batch_equals_single_images_and_prompts_equal_single_calls():
    model = make_tiny_vit("vit-p4-ls")
    w = LeWrapper(model)
    image = rand_image(3, 16, 24)
    text = unit_text(5, dim=32)
    full = w.compute_legrad(text, image=image)
    for b in range(3):
        torch.testing.assert_close(full[b : b + 1], w.compute_legrad(text, image=image[b : b + 1]), atol=1e-6, rtol=0)
        for p in range(5):
            single = w.compute_legrad(text[p : p + 1], image=image[b : b + 1])
            torch.testing.assert_close(full[b : b + 1, p : p + 1], single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_prompt_chunk_does_not_change_result(chunk):
    model = make_tiny_vit()
    w = LeWrapper(model)
    image, text = rand_image(2, 32, 32), unit_text(7)
    torch.testing.assert_close(
        w.compute_legrad(text, image=image, prompt_chunk=chunk), w.compute_legrad(text, image=image),
        atol=1e-6, rtol=0,
    )


def test_constant_map_is_zero():
    # A text embedding orthogonal to every layer feature direction is impossible to build in general,
    # but a zero text embedding gives a zero score, a zero gradient and thus a constant map.
    model = make_tiny_vit()
    maps = LeWrapper(model).compute_legrad(torch.zeros(1, 32), image=rand_image(1, 32, 32))
    assert torch.equal(maps, torch.zeros_like(maps))


def test_train_mode_gives_eval_semantics_and_stays_in_train_mode():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(
        "ViT-B-16", pretrained=None, embed_dim=32, force_patch_dropout=0.5,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16),
        text_cfg=dict(width=32, heads=2, layers=1, context_length=8),
    )
    model.train()
    image, text = rand_image(2, 32, 32), unit_text(2)
    maps_train = LeWrapper(model).compute_legrad(text, image=image)
    assert model.training and model.visual.training and model.visual.patch_dropout.training
    maps_eval = LeWrapper(model).compute_legrad(text, image=image)
    torch.testing.assert_close(maps_train, maps_eval, atol=0, rtol=0)
    torch.testing.assert_close(maps_train, openclip_vit_oracle(model, image, text, -2), atol=1e-5, rtol=0)


def test_bf16_model_agrees_with_fp32():
    model = make_tiny_vit("vit-p8")
    image, text = rand_image(2, 64, 64), unit_text(3)
    ref = LeWrapper(model).compute_legrad(text, image=image)
    low = copy.deepcopy(model).to(torch.bfloat16)
    maps = LeWrapper(low).compute_legrad(text.to(torch.bfloat16), image=image.to(torch.bfloat16))
    assert maps.dtype == torch.float32 and torch.isfinite(maps).all()
    for b in range(2):
        for p in range(3):
            corr = torch.corrcoef(torch.stack([maps[b, p].flatten(), ref[b, p].flatten()]))[0, 1]
            assert corr > 0.99, (b, p, corr)


def test_inside_no_grad_and_inference_mode():
    model = make_tiny_vit()
    w = LeWrapper(model)
    image, text = rand_image(1, 32, 32), unit_text(2)
    ref = w.compute_legrad(text, image=image)
    with torch.no_grad():
        torch.testing.assert_close(w.compute_legrad(text, image=image), ref)
    with torch.inference_mode():
        inf_image, inf_text = image.clone(), text.clone()
        torch.testing.assert_close(w.compute_legrad(inf_text, image=inf_image), ref)


def test_text_with_grad_history_is_accepted_and_no_weight_grads():
    model = make_tiny_vit()
    w = LeWrapper(model)
    tokens = open_clip.tokenize(["a cat", "a dog"], context_length=8)
    text = w.encode_text(tokens, normalize=True)  # carries an autograd graph
    assert text.requires_grad
    w.compute_legrad(text, image=rand_image(1, 32, 32))
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- delegation


def test_delegation_keeps_openclip_api():
    model = make_tiny_vit("custom-text")
    w = LeWrapper(model)
    image = rand_image(2, 24, 24)
    tokens = open_clip.tokenize(["a", "b"], context_length=8)
    with torch.no_grad():
        torch.testing.assert_close(w.encode_image(image), model.encode_image(image), atol=0, rtol=0)
        torch.testing.assert_close(w.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)
        out_w, out_m = w(image, tokens), model(image, tokens)
    for a, b in zip(out_w, out_m, strict=False):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert w.logit_scale is model.logit_scale
    assert w.visual is model.visual and w.model is model
    assert w.eval() is w and w.to("cpu") is w and w.train(False) is w
    assert list(w.state_dict()) == list(model.state_dict())
    fresh = make_tiny_vit("custom-text", seed=5)
    fresh.load_state_dict(w.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode_image(image), model.encode_image(image), atol=0, rtol=0)
    assert "encode_image" in dir(w) and "compute_legrad" in dir(w)
    w.some_user_attr = 3  # attribute writes land on the model (delegation, not copies)
    assert model.some_user_attr == 3
    del w.some_user_attr
    assert not hasattr(model, "some_user_attr")
    assert isinstance(copy.deepcopy(w), LeWrapper)


def test_wrapping_a_wrapper_and_layer_index_setter():
    model = make_tiny_vit()
    empty = unit_text(1)[0]
    inner = LeWrapper(model, layer_index=0, tokenizer=str.split, empty_text_embedding=empty, apply_correction=False,
                      correction_threshold=0.3, max_memory=2**40, max_tokens=99)
    w = LeWrapper(inner)  # keeps every setting of the inner wrapper
    assert w.model is model and w.layer_index == 0 and w._tokenizer is str.split
    assert w._empty_text_embedding is empty and w.apply_correction is False and w.correction_threshold == 0.3
    assert w.max_memory == 2**40 and w.max_tokens == 99
    w2 = LeWrapper(inner, layer_index=-1, apply_correction=True, max_tokens=None)  # unless overridden
    assert w2.layer_index == -1 and w2.apply_correction is True and w2.max_tokens is None
    assert w2._tokenizer is str.split and w2.correction_threshold == 0.3
    assert LeWrapper(model).layer_index == -2
    w.layer_index = -3
    assert w.layer_index == -3
    with pytest.raises(ValueError, match="out of range"):
        w.layer_index = 3
    assert w.layer_index == -3


# --------------------------------------------------------------------------- integrity


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "modes": {k: m.training for k, m in model.named_modules()},
        "forwards": {k: m.__dict__.get("forward") for k, m in model.named_modules()},
        "classes": {k: type(m) for k, m in model.named_modules()},
        "attrs": {k: sorted(m.__dict__) for k, m in model.named_modules()},
    }


def _hooks(model: torch.nn.Module) -> list:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    found = []
    for k, m in model.named_modules():
        for n in names:
            if getattr(m, n, None):
                found.append((k, n))
    for k, p in model.named_parameters():
        if getattr(p, "_backward_hooks", None):
            found.append((k, "param"))
    return found


def assert_intact(model, before):
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k in before["state"]:
        assert same_bits(after["state"][k], before["state"][k]), k
        assert after["state"][k].dtype == before["state"][k].dtype, k
    for key in ("flags", "modes", "forwards", "classes", "attrs"):
        assert after[key] == before[key], key
    assert _hooks(model) == []


def test_model_intact_after_calls_and_errors():
    model = make_tiny_vit()
    model.visual.transformer.resblocks[0].requires_grad_(False)
    model.train()
    before = _snapshot(model)
    image = rand_image(1, 32, 32)
    with torch.no_grad():
        ref_out = model.eval().encode_image(image)
    model.train()
    w = LeWrapper(model)
    for size in [(32, 32), (64, 48), (16, 24), (32, 32)]:
        w.compute_legrad(unit_text(3), image=rand_image(2, *size))
    for bad in [rand_image(1, 30, 32), torch.full((1, 3, 32, 32), float("nan"))]:
        with pytest.raises(ValueError):
            w.compute_legrad(unit_text(1), image=bad)
    assert_intact(model, before)
    with torch.no_grad():
        out = model.eval().encode_image(image)
    assert torch.equal(out, ref_out)


@pytest.mark.slow
def test_vit_b16_448_then_224_unwrapped_output_bitwise_equal_to_fresh_model():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    torch.manual_seed(0)
    fresh = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    w = LeWrapper(model)
    w.compute_legrad(unit_text(2, dim=512), image=rand_image(1, 448, 448))
    image = rand_image(1, 224, 224, seed=7)
    with torch.no_grad():
        assert torch.equal(model.encode_image(image), fresh.encode_image(image))
    assert _hooks(model) == []


# --------------------------------------------------------------------------- threads


def test_concurrent_calls_match_sequential():
    model = make_tiny_vit()
    w = LeWrapper(model)
    jobs = [(unit_text(p, seed=p), rand_image(b, h, wd, seed=h + wd), li)
            for p, b, h, wd, li in [(1, 1, 32, 32, -1), (3, 2, 48, 32, -2), (2, 1, 64, 64, 0), (4, 3, 16, 40, -3)]]
    expected = [w.compute_legrad(t, image=i, layer_index=li) for t, i, li in jobs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(idx: int) -> None:
        try:
            for _ in range(3):
                t, i, li = jobs[idx]
                results[idx] = w.compute_legrad(t, image=i, layer_index=li)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    prev = torch.get_num_threads()
    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.set_num_threads(prev)
    assert not errors, errors
    for k, exp in enumerate(expected):
        torch.testing.assert_close(results[k], exp, atol=0, rtol=0)
