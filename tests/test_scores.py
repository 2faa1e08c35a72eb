"""``compute_legrad(..., return_scores=True)``: the model's own image embeddings and image-prompt scores
from the same run as the maps, checked against the model's own forward (``encode_image``,
``get_image_features``, the classifier's logits) for every kind of tower, and the maps unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.models import make_tiny_vit, rand_image, unit_text
from helpers.tiny_towers import build_tiny

from legrad import LeGradOutput, LeWrapper


def _unwrap(out):
    """A transformers features output (4.x: a tensor; 5.x: an object with ``pooler_output``) as a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _native(model) -> tuple[int, int]:
    """The image size an open_clip model's tower was built for (timm trunks: the trunk's own)."""
    trunk = getattr(model.visual, "trunk", None)
    size = trunk.patch_embed.img_size if trunk is not None else model.visual.image_size
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _check(wrapper, image, want_features, prompts, *, classifier=False, **kw):
    """return_scores gives the oracle's features and scores, and maps bitwise equal to a plain call."""
    arg = {"target": prompts} if classifier else {"text_embedding": prompts}
    plain = wrapper.compute_legrad(image=image, **arg, **kw)
    out = wrapper.compute_legrad(image=image, return_scores=True, **arg, **kw)
    assert isinstance(out, LeGradOutput)
    maps, features, scores = out  # unpacks like a tuple
    assert torch.equal(maps, plain)
    if classifier:
        want_scores = want_features[:, prompts] if prompts.ndim == 1 else want_features.gather(1, prompts)
    else:
        want_features = F.normalize(want_features, dim=-1)
        want_scores = (want_features @ prompts.T if prompts.ndim == 2
                       else torch.einsum("bd,bpd->bp", want_features, prompts))
    assert features.dtype == scores.dtype == torch.float32 and features.device == image.device
    torch.testing.assert_close(features, want_features, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(scores, want_scores, atol=2e-5, rtol=1e-4)
    assert scores.shape == (image.shape[0], prompts.shape[-1] if classifier else prompts.shape[-2])


@pytest.mark.parametrize("kind", ["vit-p8", "vit-p4-ls", "clipa-avg"])
@pytest.mark.parametrize("layer_index", [0, -1])
def test_open_clip_vit(kind, layer_index):
    model = make_tiny_vit(kind)
    image = rand_image(2, *_native(model))
    with torch.no_grad():
        want = model.encode_image(image)
    _check(LeWrapper(model, layer_index=layer_index), image, want, unit_text(3))
    # per-image prompts [B, P, D]
    _check(LeWrapper(model), image, want, unit_text(2, batch=2))


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "EVA02-B-16", "coca_ViT-B-32"])
def test_timm_and_attention_pooled_towers(name):
    """timm towers (SigLIP's attention pool, EVA02's CLS pool) and CoCa's attentional pooler."""
    model = build_tiny(name)
    wrapper = LeWrapper(model, apply_correction=False)
    image = rand_image(2, *_native(model))
    with torch.no_grad():
        want = model.encode_image(image)
    _check(wrapper, image, want, unit_text(3, dim=want.shape[-1]))


def test_siglip_correction_prompt_is_not_a_score():
    """With the empty-prompt correction on, the extra prompt stays internal: P scores for P prompts."""
    model = build_tiny("ViT-B-16-SigLIP")
    image = rand_image(1, *_native(model))
    with torch.no_grad():
        want = model.encode_image(image)
    empty = unit_text(1, dim=want.shape[-1], seed=9)[0]
    _check(LeWrapper(model, empty_text_embedding=empty), image, want, unit_text(2, dim=want.shape[-1]))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hugging_face(kind):
    pytest.importorskip("transformers")
    from helpers.hf_models import embed_dim, make_model

    model = make_model(kind)
    image = rand_image(2, 32, 32)
    with torch.no_grad():
        want = _unwrap(model.get_image_features(pixel_values=image))
    _check(LeWrapper(model, apply_correction=False), image, want, unit_text(3, dim=embed_dim(model)))


def test_siglip2_naflex_batch_of_different_sizes():
    """Maps come back as a list (one size per image); features and scores are still [B, D] and [B, P]."""
    pytest.importorskip("transformers")
    from helpers.hf_models import embed_dim, make_model, naflex_batch

    model = make_model("siglip2")
    inputs = naflex_batch([(3, 4), (4, 5), (2, 2)], max_patches=24)
    text = unit_text(2, dim=embed_dim(model))
    wrapper = LeWrapper(model, apply_correction=False)
    plain = wrapper.compute_legrad(text, image=inputs)
    maps, features, scores = wrapper.compute_legrad(text, image=inputs, return_scores=True)
    assert isinstance(maps, list) and all(torch.equal(a, b) for a, b in zip(maps, plain))
    with torch.no_grad():
        want = F.normalize(_unwrap(model.get_image_features(**inputs)), dim=-1)
    torch.testing.assert_close(features, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(scores, want @ text.T, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["torchvision", "timm:vit-token", "timm:vit-map", "timm:deit-distilled",
                                    "hf:ViTForImageClassification"])
def test_classifiers_give_the_models_logits(family):
    pytest.importorskip("timm")
    from test_classifiers import make_hf, make_timm, make_torchvision

    if family == "torchvision":
        model = make_torchvision()
    else:
        lib, _, kind = family.partition(":")
        model = make_timm(kind) if lib == "timm" else make_hf(kind)
    image = rand_image(2, 32, 32)
    with torch.no_grad():
        want = model(image)
        want = getattr(want, "logits", want)
    wrapper = LeWrapper(model)
    _check(wrapper, image, want, torch.tensor([3, 1]), classifier=True)
    _check(wrapper, image, want, torch.tensor([[0, 5], [2, 2]]), classifier=True, layer_index=-1)


def test_half_precision_model_gives_float32_scores():
    model = make_tiny_vit("vit-p8").to(torch.bfloat16)
    image = rand_image(1, 32, 32)
    out = LeWrapper(model).compute_legrad(unit_text(2), image=image, return_scores=True)
    with torch.no_grad():
        want = F.normalize(model.encode_image(image.to(torch.bfloat16)).float(), dim=-1)
    assert out.image_features.dtype == torch.float32
    torch.testing.assert_close(out.image_features, want, atol=3e-2, rtol=0)


def test_return_scores_must_be_a_bool():
    wrapper = LeWrapper(make_tiny_vit("vit-p8"))
    with pytest.raises(TypeError, match="return_scores must be True or False"):
        wrapper.compute_legrad(unit_text(2), image=rand_image(1, 32, 32), return_scores="yes")


def test_no_second_forward(monkeypatch):
    """The embedding comes from the run that makes the maps: every block runs once per call, and the
    model's own forward is never called."""
    model = make_tiny_vit("vit-p8")
    wrapper = LeWrapper(model, layer_index=1)
    from legrad.adapters import runner

    runs = []
    plain, explained = runner.plain_block, runner.explained_block
    monkeypatch.setattr(runner, "plain_block", lambda *a: (runs.append("plain"), plain(*a))[1])
    monkeypatch.setattr(runner, "explained_block", lambda layer, *a: (runs.append(layer), explained(layer, *a))[1])
    forwards = []
    handle = model.visual.register_forward_hook(lambda *a: forwards.append(1))
    try:
        out = wrapper.compute_legrad(unit_text(2), image=rand_image(1, 32, 32), return_scores=True)
    finally:
        handle.remove()
    assert runs == ["plain", 1, 2] and not forwards  # block 0 without a graph, blocks 1-2 explained, once
    assert out.scores.shape == (1, 2)
