"""LeWrapper on ViT image classifiers (timm, torchvision, transformers): oracle, torchcam, integrity, errors."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from helpers.classifier_oracles import (
    finish,
    hf_grids,
    hf_layer_agrees,
    timm_classifier_grids,
    torchvision_forward,
    torchvision_grids,
)
from helpers.models import make_tiny_vit, rand_image, unit_text
from test_wrapper import _snapshot, assert_intact

from legrad import LeWrapper
from legrad.classifiers import class_logits
from legrad.engine.validation import check_targets as checked_targets

TINY = dict(pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)

# name -> (timm model name, extra kwargs)
TIMM_KINDS = {
    "vit-token": ("vit_tiny_patch16_224", dict(num_classes=10)),
    "vit-avg-reg-fcnorm": ("vit_tiny_patch16_224", dict(num_classes=7, global_pool="avg", reg_tokens=2,
                                                        class_token=True, fc_norm=True)),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(num_classes=10)),
    "vit-in21k": ("vit_base_patch16_224.augreg_in21k", {}),  # keeps its 21843-class head
    "vit-map": ("vit_tiny_patch16_224", dict(num_classes=10, global_pool="map")),
    "eva02": ("eva02_tiny_patch14_224", dict(num_classes=10, patch_size=8)),
    "deit3": ("deit3_small_patch16_224", dict(num_classes=10)),  # layer scale, no_embed_class
    "vit-relpos": ("vit_relpos_small_patch16_224", dict(num_classes=10)),
}


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random non-trivial norms and heads (timm and torchvision initialise some of them to zero/identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm) and mod.weight is not None:
                mod.weight.add_(0.1 * torch.randn(mod.weight.shape, generator=g))
                mod.bias.add_(0.1 * torch.randn(mod.bias.shape, generator=g))
        for name, p in model.named_parameters():
            if any(k in name for k in ("head", "classifier", "heads")) or name.endswith(("cls_token", "dist_token")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def make_timm(kind: str, seed: int = 0) -> torch.nn.Module:
    name, extra = TIMM_KINDS[kind]
    torch.manual_seed(seed)
    kwargs = {**TINY, **extra}
    return _perturb(timm.create_model(name, **kwargs), seed)


def make_torchvision(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = dict(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    cfg.update(kw)
    return _perturb(torchvision.models.vision_transformer.VisionTransformer(**cfg), seed)


def make_hf(cls_name: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    config_cls = transformers.ViTConfig if cls_name.startswith("ViT") else transformers.DeiTConfig
    cfg = config_cls(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, num_labels=10)
    torch.manual_seed(seed)
    return _perturb(getattr(transformers, cls_name)(cfg), seed)


def _targets(kind: str, per_image: bool) -> torch.Tensor:
    top = 21842 if kind == "vit-in21k" else 6
    return torch.tensor([[0, top], [top, 3]]) if per_image else torch.tensor([top, 1, 3])


# --------------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("kind", list(TIMM_KINDS))
@pytest.mark.parametrize("per_image", [False, True])
def test_timm_matches_oracle_non_square_model_intact(kind, per_image):
    model = make_timm(kind)
    before = _snapshot(model)
    image = rand_image(2, 32, 48)
    target = _targets(kind, per_image)
    maps = LeWrapper(model).compute_legrad(image=image, target=target)
    assert maps.shape == (2, target.shape[-1], 32, 48) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    expected = finish(timm_classifier_grids(model, image, target, -2), (32, 48))
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    assert_intact(model, before)


@pytest.mark.parametrize("kind", ["vit-token", "deit-distilled", "vit-map"])
def test_timm_logits_equal_model_output(kind):
    model = make_timm(kind)
    image = rand_image(2, 32, 32)
    with torch.no_grad():
        expected = model(image)
    torch.testing.assert_close(class_logits(LeWrapper(model), image), expected, atol=1e-5, rtol=1e-5)


def test_timm_layer_index_zero_and_grid_output():
    model = make_timm("vit-token")
    image = rand_image(2, 40, 32)
    target = torch.tensor([2, 5])
    grid = LeWrapper(model, layer_index=0).compute_legrad(image=image, target=target, output_size="grid")
    assert grid.shape == (2, 2, 5, 4)
    torch.testing.assert_close(grid, finish(timm_classifier_grids(model, image, target, 0), None), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer_index", [-2, 0])
def test_torchvision_matches_oracle(layer_index):
    model = make_torchvision()
    before = _snapshot(model)
    image = rand_image(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torchvision_forward(model, image), model(image), atol=1e-5, rtol=0)
    target = torch.tensor([[1, 4, 9], [9, 0, 0]])
    maps = LeWrapper(model, layer_index=layer_index).compute_legrad(image=image, target=target)
    torch.testing.assert_close(maps, finish(torchvision_grids(model, image, target, layer_index), (32, 32)),
                               atol=1e-5, rtol=0)
    assert_intact(model, before)


def test_torchvision_other_sizes_and_logits():
    model = make_torchvision()
    w = LeWrapper(model)
    image = rand_image(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(class_logits(w, image), model(image), atol=1e-5, rtol=1e-5)
    maps = w.compute_legrad(image=rand_image(1, 24, 40), target=3)
    assert maps.shape == (1, 1, 24, 40) and torch.isfinite(maps).all()


@pytest.mark.parametrize("cls_name", ["ViTForImageClassification", "DeiTForImageClassification",
                                      "DeiTForImageClassificationWithTeacher"])
def test_hf_matches_oracle(cls_name):
    model = make_hf(cls_name)
    before = _snapshot(model)
    image = rand_image(2, 32, 48)
    assert hf_layer_agrees(model, image)
    target = torch.tensor([7, 2])
    w = LeWrapper(model)
    maps = w.compute_legrad(image=image, target=target)
    torch.testing.assert_close(maps, finish(hf_grids(model, image, target, -2), (32, 48)), atol=1e-5, rtol=0)
    # the processor's output mapping is accepted as is
    torch.testing.assert_close(w.compute_legrad(image={"pixel_values": image}, target=target), maps)
    square = rand_image(2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(class_logits(w, square), model(square).logits, atol=1e-5, rtol=1e-5)
    assert_intact(model, before)


# --------------------------------------------------------------------------------------------- torchcam
def _torchcam_grids(model, image, classes, num_layers):
    """torchcam 0.5's LeGrad on a deep copy (it hooks the model), one class per call."""
    from torchcam.methods import LeGrad

    cam_model = copy.deepcopy(model).eval()
    out = []
    with LeGrad(cam_model, list(cam_model.encoder.layers)[-num_layers:]) as extractor:
        for c in classes:
            scores = cam_model(image)
            out.append(extractor(class_idx=c, scores=scores)[0].detach())
    return torch.stack(out, dim=1)


def test_agrees_with_torchcam_small_torchvision_vit():
    pytest.importorskip("torchcam")
    model = make_torchvision(image_size=32, num_layers=4)
    image = rand_image(2, 32, 32)
    ours = LeWrapper(model, layer_index=-2).compute_legrad(image=image, target=[3, 8], output_size="grid")
    torch.testing.assert_close(ours, _torchcam_grids(model, image, [3, 8], 2), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_agrees_with_torchcam_vit_b_16():
    pytest.importorskip("torchcam")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None)
    with torch.no_grad():
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        torch.nn.init.normal_(model.heads.head.bias, std=0.02)
    model.eval()
    before = _snapshot(model)
    image = rand_image(2, 224, 224)
    ours = LeWrapper(model, layer_index=-2).compute_legrad(image=image, target=[281, 285], output_size="grid")
    assert ours.shape == (2, 2, 14, 14)
    torch.testing.assert_close(ours, _torchcam_grids(model, image, [281, 285], 2), atol=1e-4, rtol=0)
    assert_intact(model, before)


# --------------------------------------------------------------------------------------------- semantics
def test_train_mode_gives_eval_semantics():
    model = make_torchvision(dropout=0.3, attention_dropout=0.3)
    image = rand_image(2, 32, 32)
    ref = LeWrapper(model).compute_legrad(image=image, target=[1, 2])
    model.train()
    torch.testing.assert_close(LeWrapper(model).compute_legrad(image=image, target=[1, 2]), ref)
    assert model.training


@pytest.mark.parametrize("chunk", [1, 2])
def test_target_forms_batch_and_chunk_invariance(chunk):
    model = make_timm("vit-token")
    w = LeWrapper(model)
    image = rand_image(2, 32, 32)
    full = w.compute_legrad(image=image, target=[4, 1, 4])
    torch.testing.assert_close(w.compute_legrad(image=image, target=torch.tensor([4, 1, 4]), prompt_chunk=chunk), full)
    torch.testing.assert_close(w.compute_legrad(image=image, target=torch.tensor([[4, 1, 4]] * 2)), full)
    torch.testing.assert_close(w.compute_legrad(image=image[1:], target=1), full[1:, 1:2], atol=1e-6, rtol=0)
    torch.testing.assert_close(full[:, 0], full[:, 2])


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "target,exc,match",
    [
        (None, ValueError, "target is required"),
        (10, ValueError, "out of range.*10 classes"),
        ([-1], ValueError, "out of range"),
        ([], ValueError, "no class index"),
        (torch.tensor([1.0]), TypeError, "integer tensor"),
        (True, TypeError, "bool"),
        ("3", TypeError, "target must be"),
        ([[1], [2]], TypeError, "per-image"),
        (torch.tensor([[1], [2], [3]]), ValueError, "B=3"),
        (torch.zeros(1, 1, 1, dtype=torch.long), ValueError, r"\[P\] or \[B, P\]"),
    ],
)
def test_bad_targets(target, exc, match):
    model = make_torchvision()
    before = _snapshot(model)
    with pytest.raises(exc, match=match):
        LeWrapper(model).compute_legrad(image=rand_image(2, 32, 32), target=target)
    assert_intact(model, before)


def test_checked_targets_accepts_numpy_and_ranges():
    np = pytest.importorskip("numpy")
    assert checked_targets(np.array([1, 2]), 2, 5).tolist() == [1, 2]
    assert checked_targets(np.int64(3), 1, 5).tolist() == [3]
    assert checked_targets(range(3), 1, 5).tolist() == [0, 1, 2]


def test_text_embedding_to_classifier_and_target_to_clip_are_refused():
    clf = LeWrapper(make_torchvision())
    image = rand_image(1, 32, 32)
    with pytest.raises(TypeError, match="image classifier.*target="):
        clf.compute_legrad(unit_text(2), image=image)
    with pytest.raises(TypeError, match="image goes in image="):
        clf.compute_legrad(image)
    with pytest.raises(TypeError, match="compute_legrad_clip does not apply"):
        clf.compute_legrad_clip(None, image=image)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        clf.compute_legrad(image=rand_image(1, 30, 32), target=1)
    with pytest.raises(ValueError, match="layer_index"):
        clf.compute_legrad(image=image, target=1, layer_index=3)
    with pytest.raises(TypeError, match="unexpected keyword"):
        clf.compute_legrad(image=image, target=1, pixel_attention_mask=None)
    clip = LeWrapper(make_tiny_vit())
    with pytest.raises(TypeError, match="give one target, got text_embedding and target"):
        clip.compute_legrad(unit_text(2), image=rand_image(1, 32, 32), target=1)
    with pytest.raises(TypeError, match="target= selects classes"):
        clip.compute_legrad(image=rand_image(1, 32, 32), target=1)
    with pytest.raises(TypeError, match="needs an image classifier"):
        class_logits(clip, rand_image(1, 32, 32))


def test_headless_models_are_refused():
    torch.manual_seed(0)
    headless = timm.create_model("vit_tiny_patch16_224", **TINY, num_classes=0)
    with pytest.raises(TypeError, match="unsupported image tower"):
        LeWrapper(headless)
    import transformers

    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64, num_labels=0)
    with pytest.raises(TypeError, match="no classification head"):
        LeWrapper(transformers.ViTForImageClassification(cfg))


# --------------------------------------------------------------------------------------------- traced forward
_FAMILIES = [*(f"timm:{k}" for k in ("vit-token", "vit-avg-reg-fcnorm", "deit-distilled", "vit-map", "eva02",
                                     "deit3", "vit-relpos")),
             "torchvision", "hf:ViTForImageClassification", "hf:DeiTForImageClassificationWithTeacher"]


def _make(family: str) -> torch.nn.Module:
    if family == "torchvision":
        return make_torchvision()
    lib, _, kind = family.partition(":")
    return make_timm(kind) if lib == "timm" else make_hf(kind)


@pytest.mark.parametrize("family", _FAMILIES)
def test_traced_forward_ends_in_the_models_own_logits(family):
    """The gradient baselines' traced graph (TowerAdapter.trace) gives the model's eval-mode logits, its
    steps hold every block's attention output and input tokens in the graph, and the model is untouched."""
    model = _make(family)
    before = _snapshot(model)
    image = rand_image(2, 32, 32)
    adapter = LeWrapper(model).adapter
    with torch.no_grad():
        want = model(image)
        want = getattr(want, "logits", want)
        steps, logits = adapter.trace(image, torch.float32)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
    assert len(steps) == adapter.depth and all(s.out.requires_grad and s.tokens.requires_grad for s in steps)
    # The first block's attention output reaches the logits through the graph.
    (g,) = torch.autograd.grad(logits[:, 0].sum(), steps[0].out)
    assert float(g.abs().sum()) > 0
    assert_intact(model, before)
