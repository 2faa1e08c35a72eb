"""``legrad.methods``: LeGrad as a method (the pipeline call of ``compute_legrad``, raw relevance checked
against an explicit oracle), targets as types (a score function equals the text / class target it
spells out), the registry, and the errors raised before any work.

The baselines' oracle agreement (normalised and raw) is in tests/test_baselines.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.oracles import openclip_vit_oracle
from helpers.tiny_towers import build_tiny, random_image, random_text, same_bits
from test_baselines_classifiers import make_timm

from legrad import LeWrapper
from legrad.methods import (
    METHODS,
    AttentionRollout,
    CheferCAM,
    Classes,
    GradCAM,
    LeGrad,
    Method,
    RawAttention,
    Score,
    Text,
    make_method,
    method_names,
    register_method,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip():
    return build_tiny("ViT-B-32").double()


def _clip_inputs(batch: int = 2, prompts: int = 3):
    return random_image(batch, 32, 32).double(), random_text(prompts, 32).double()


def test_registry_lists_every_method_legrad_first():
    assert method_names()[0] == "legrad"
    assert {"legrad", "gradcam", "rollout", "chefercam", "raw_attention"} <= set(METHODS)
    classes = {METHODS[n] for n in ("legrad", "gradcam", "rollout", "chefercam", "raw_attention")}
    assert classes == {LeGrad, GradCAM, AttentionRollout, CheferCAM, RawAttention}


def test_legrad_method_is_compute_legrad(clip):
    image, text = _clip_inputs()
    wrapper = LeWrapper(clip)
    want = wrapper.compute_legrad(text, image=image)
    assert same_bits(LeGrad(wrapper).attribute(image, target=text), want)
    assert same_bits(LeGrad(clip).attribute(image, target=Text(text)), want)
    assert same_bits(make_method("legrad@-1", clip).attribute(image, target=text),
                     wrapper.compute_legrad(text, image=image, layer_index=-1))
    # the oracle (explicit attention, autograd per prompt and layer)
    torch.testing.assert_close(want, openclip_vit_oracle(clip, image, text, -2), atol=1e-5, rtol=0)


def test_legrad_raw_relevance_is_the_oracles_sum(clip):
    """normalize=False: the sum over layers of the upsampled relu-gradient maps, not min-max normalised."""
    image, text = _clip_inputs()
    raw = LeGrad(clip).attribute(image, target=text, normalize=False)
    want = openclip_vit_oracle(clip, image, text, -2, normalize=False)
    torch.testing.assert_close(raw, want, atol=1e-6 * float(want.abs().max()), rtol=1e-5)
    assert float(raw.max()) < 0.5  # raw gradients of a cosine, not a [0, 1] map
    # per (image, prompt) min-max of the raw maps gives the normalised maps
    flat = raw.flatten(2).double()
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    torch.testing.assert_close(((flat - lo) / (hi - lo)).reshape(raw.shape).float(),
                               LeGrad(clip).attribute(image, target=text), atol=1e-5, rtol=0)
    grid = LeGrad(clip).attribute(image, target=text, normalize=False, output_size="grid")
    assert grid.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("name", ["legrad", "gradcam", "chefercam"])
def test_score_function_equals_the_text_it_spells_out(clip, name):
    """``Score(cosine with t)`` is ``Text(t)``: the readout is the un-normalised embedding."""
    image, text = _clip_inputs()
    method = make_method(name, clip)
    want = method.attribute(image, target=text)
    got = method.attribute(image, target=Score(lambda r: F.normalize(r, dim=-1) @ text.T.to(r.dtype)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # a plain callable is a Score; per-image scores [B, P] from one function
    per_image = random_text(1, 32, seed=5, batch=2).double()  # [B, 1, D]
    got = method.attribute(image, target=lambda r: (F.normalize(r, dim=-1)[:, None] * per_image).sum(-1))
    torch.testing.assert_close(got, method.attribute(image, target=per_image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["legrad", "gradcam", "chefercam", "rollout"])
def test_classifier_targets_as_types(name):
    model = make_timm("token")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    method = make_method(name, model)
    want = method.attribute(image, target=[3, 5])
    assert same_bits(method.attribute(image, target=Classes(torch.tensor([3, 5]))), want)
    assert same_bits(method.attribute(image, target=torch.tensor([3, 5])), want)
    torch.testing.assert_close(method.attribute(image, target=Score(lambda logits: logits[:, [3, 5]])), want,
                               atol=1e-6, rtol=0)


def test_a_method_wraps_the_model_once(clip, monkeypatch):
    calls = []
    import legrad.wrapper as wrapper_module

    real = wrapper_module.check_drift
    monkeypatch.setattr(wrapper_module, "check_drift", lambda *a: calls.append(1) or real(*a))
    image, text = _clip_inputs(1, 2)
    m = GradCAM(clip)
    for _ in range(3):
        m.attribute(image, target=text)
    assert len(calls) == 1


def test_captum_style_tuple_inputs(clip):
    image, text = _clip_inputs()
    m = GradCAM(clip)
    (got,) = m.attribute((image,), target=text)  # captum: explanations shaped as the inputs (a tuple)
    assert same_bits(got, m.attribute(image, target=text))


def test_errors_before_any_work(clip):
    image, text = _clip_inputs()
    with pytest.raises(TypeError, match="unknown option"):
        GradCAM(clip, start_layer=1)
    with pytest.raises(TypeError, match="unknown option"):
        GradCAM(clip).attribute(image, target=text, layer_index=1)
    with pytest.raises(TypeError, match="normalize"):
        LeGrad(clip).attribute(image, target=text, normalize="no")
    with pytest.raises(TypeError, match="target= is required"):
        LeGrad(clip).attribute(image)
    with pytest.raises(ValueError, match=r"\[B, P\]"):
        LeGrad(clip).attribute(image, target=Score(lambda r: r.sum()))
    with pytest.raises(TypeError, match="Score takes a function"):
        Score(3)
    with pytest.raises(ValueError, match="unknown method"):
        make_method("nope", clip)
    with pytest.raises(ValueError, match="first block"):
        make_method("gradcam@2", clip)
    with pytest.raises(TypeError, match="tokenizer"):
        LeGrad(clip).attribute(image, target=["a cat"])


def test_string_prompts_with_a_tokenizer(clip):
    def tokenizer(texts):  # the tiny text tower's vocabulary is small: ids from word lengths
        rows = [[1 + len(w) for w in t.split()] + [9] for t in texts]
        return torch.tensor([r + [0] * (8 - len(r)) for r in rows])

    image, _ = _clip_inputs()
    prompts = ["a cat", "a dog"]
    with torch.no_grad():
        text = clip.encode_text(tokenizer(prompts), normalize=True)
    want = LeGrad(clip).attribute(image, target=text)
    assert same_bits(LeGrad(clip).attribute(image, target=Text(prompts, tokenizer=tokenizer)), want)


def test_register_a_method():
    class Flat(Method):
        name = "flat_test"

        def maps(self, image, target, normalize, **call_options):
            return torch.zeros(image.shape[0], 1, *image.shape[-2:])

    try:
        assert register_method(Flat) is Flat and METHODS["flat_test"] is Flat
        with pytest.raises(ValueError, match="already registered"):
            register_method(type("Other", (Flat,), {}))
        with pytest.raises(TypeError, match="Method subclass"):
            register_method(object)
    finally:
        METHODS.pop("flat_test", None)
