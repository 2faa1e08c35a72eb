"""Front-end loading of image classifiers: ``timm:``/``torchvision:``/``hf:`` names, their preprocess,
class names, fail-fast errors, and the Explainer's class targets (random-init models only)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from legrad.frontend import classifier_models as cl
from legrad.frontend.classifier_models import ClassLabels
from legrad.frontend.explainer import Explainer, clean_targets
from legrad.frontend.models import load_model, native_image_size
from legrad.io.errors import ModelLoadError

timm = pytest.importorskip("timm")


def _image(h=90, w=130, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------ ClassLabels
LABELS = ClassLabels(5, ["tabby, tabby cat", "crane", "crane", "tiger cat", "Egyptian_cat"])


@pytest.mark.parametrize("target, index", [
    ("tabby", 0), ("Tabby  Cat", 0), ("tabby, tabby cat", 0), ("tiger cat", 3), ("egyptian cat", 4),
    ("4", 4), (2, 2), (" 1 ", 1),
])
def test_labels_resolve(target, index):
    assert LABELS.resolve_one(target) == index


def test_labels_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"ambiguous.*1 \(crane\), 2 \(crane\)"):
        LABELS.resolve_one("crane")
    with pytest.raises(ValueError, match=r"unknown class name 'tabbby'.*'tabby' \(0\)"):
        LABELS.resolve_one("tabbby")
    with pytest.raises(ValueError, match="out of range.*5 classes"):
        LABELS.resolve_one(5)
    with pytest.raises(ValueError, match="out of range"):
        LABELS.resolve_one("-1")
    with pytest.raises(TypeError):
        LABELS.resolve_one(1.5)
    with pytest.raises(ValueError, match="at least one"):
        LABELS.resolve(["", "  "])
    with pytest.raises(ValueError, match="too many"):
        LABELS.resolve([0] * (cl.MAX_TARGETS + 1))
    with pytest.raises(ValueError, match="no class names"):
        ClassLabels(3).resolve_one("cat")
    assert ClassLabels(3).label(2) == "class 2" and LABELS.label(0) == "tabby (0)"
    assert LABELS(["tabby", 3]).tolist() == [0, 3]


def test_clean_targets():
    assert clean_targets([" tabby  cat ", "", 3]) == ["tabby cat", 3]
    with pytest.raises(ValueError, match="--target"):
        clean_targets(["  "])
    with pytest.raises(TypeError):
        clean_targets([None])


# ------------------------------------------------------------------------------------------ timm
def test_timm_random_init_preprocess_and_names():
    model, preprocess, labels = load_model("timm:vit_tiny_patch16_224", "none")
    assert type(model).__name__ == "VisionTransformer" and not model.training
    # The preprocess is timm's own eval transform for this model's data config.
    cfg = timm.data.resolve_data_config({}, model=model)
    want = timm.data.create_transform(**cfg)(_image())
    assert torch.allclose(preprocess(_image()), want, atol=1e-6)
    info = timm.data.ImageNetInfo("imagenet-1k")
    assert labels.num_classes == 1000
    assert labels.names[281] == info.index_to_description(281)
    assert labels(["tabby", "tabby cat", "281"]).tolist() == [281, 281, 281]
    assert native_image_size(model) == (224, 224)


@pytest.mark.parametrize("name, pretrained, message", [
    ("timm:vit_nonexistent_model", "none", "unknown timm model"),
    ("timm:resnet18", "none", "not a ViT classifier"),
    ("timm:vit_tiny_patch16_224", "no_such_tag", "unknown pretrained tag 'no_such_tag'.*augreg"),
    ("timm:vit_tiny_patch16_224", "missing/ckpt.pth", "not found"),
    ("torchvision:vit_b_99", "none", "unknown torchvision model"),
    ("torchvision:resnet18", "none", "not a ViT classifier"),
    ("torchvision:vit_b_32", "NO_SUCH", "unknown weights"),
    ("timm:", None, "give a model after timm:"),
    ("hf:./no/such/dir", None, "not found"),
])
def test_bad_names_fail_with_one_line(name, pretrained, message):
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model(name, pretrained)
    assert "\n" not in str(info.value)


def test_unreachable_weights_fail_fast(monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cl, "hub_cached", lambda repo, files: False)
    monkeypatch.setattr(cl, "_torch_hub_file", lambda url: "/nonexistent/weights.pth")

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable (test)")

    monkeypatch.setattr(socket, "create_connection", refuse)
    for name in ("timm:vit_tiny_patch16_224", "torchvision:vit_b_32", "hf:google/vit-base-patch16-224"):
        with pytest.raises(ModelLoadError, match="unreachable"):
            load_model(name, None)


def test_timm_checkpoint_file(tmp_path):
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    model, _, _ = load_model("timm:vit_tiny_patch16_224", str(path))
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


def test_explainer_classifier_scores_are_the_models_own_logits():
    explainer = Explainer.load("timm:vit_tiny_patch16_224", "none")
    model = explainer.wrapper.model
    snap = _snapshot(model)
    images = [_image(seed=1), _image(70, 60, seed=2)]
    out = explainer.explain(images, ["tabby", 285, "7"], size=(64, 96))
    assert out.maps.shape == (2, 3, 64, 96)
    assert float(out.maps.min()) >= 0 and float(out.maps.max()) <= 1
    assert out.targets == [281, 285, 7]
    assert out.prompts[0] == "tabby (281)"
    with torch.no_grad():
        logits = model(torch.stack([explainer.preprocess(im) for im in images]))
    assert torch.allclose(out.similarity, logits[:, [281, 285, 7]], atol=1e-4)
    assert torch.allclose(out.probability, logits.softmax(-1)[:, [281, 285, 7]], atol=1e-6)
    # The maps are LeGrad's for those classes at the explained size.
    from legrad.preprocess import LePreprocess

    x = torch.stack([LePreprocess(explainer.preprocess, (64, 96))(im) for im in images])
    want = explainer.wrapper.compute_legrad(image=x, target=[281, 285, 7])
    assert torch.allclose(out.maps, want, atol=1e-5)
    assert _same(model, snap)
    with pytest.raises(ValueError, match="unknown class name"):
        explainer.explain(images, ["not a class at all"])
    with pytest.raises(ValueError, match="out of range"):
        explainer.explain(images, [1000])


# ------------------------------------------------------------------------------------ torchvision
@pytest.mark.slow
def test_torchvision_random_init_and_state_dict(tmp_path):
    import torchvision

    model, preprocess, labels = load_model("torchvision:vit_b_32", "none")
    weights = torchvision.models.ViT_B_32_Weights.DEFAULT
    assert labels.names == tuple(weights.meta["categories"]) and labels(["tabby"]).tolist() == [281]
    want = weights.transforms()(_image())
    assert torch.allclose(preprocess(_image()), want, atol=1e-5)
    path = tmp_path / "tv.pth"
    torch.save(model.state_dict(), path)
    again, _, _ = load_model("torchvision:vit_b_32", str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    out = Explainer(model, preprocess, labels).explain(_image(), ["tabby"], size=(64, 64))
    assert out.maps.shape == (1, 1, 64, 64) and out.prompts == ["tabby (281)"]


# ---------------------------------------------------------------------------------- Hugging Face
def test_hf_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                                    id2label={0: "cat", 1: "dog", 2: "tabby, tabby cat"},
                                    label2id={"cat": 0, "dog": 1, "tabby, tabby cat": 2})
    torch.manual_seed(0)
    ref = transformers.ViTForImageClassification(config).eval()
    ref.save_pretrained(tmp_path)
    proc = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                          image_std=[0.2, 0.3, 0.25])
    proc.save_pretrained(tmp_path)
    model, preprocess, labels = load_model(f"hf:{tmp_path}", None)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    want = proc(images=_image(), return_tensors="pt")["pixel_values"][0]
    # The processor rounds its resized pixels differently: at most one 8-bit level apart.
    assert torch.allclose(preprocess(_image()), want, atol=1.01 / 255 / 0.2)
    assert float((preprocess(_image()) - want).abs().mean()) < 2e-3
    assert labels(["dog", "tabby cat", "0"]).tolist() == [1, 2, 0]
    explainer = Explainer(model, preprocess, labels)
    out = explainer.explain(_image(), ["dog"], size=(32, 48))
    with torch.no_grad():
        logits = ref(pixel_values=want[None]).logits
    assert out.maps.shape == (1, 1, 32, 48)
    with torch.no_grad():
        own = ref(pixel_values=preprocess(_image())[None]).logits
    assert torch.allclose(out.similarity, own[:, [1]], atol=1e-4)
    assert torch.allclose(out.similarity, logits[:, [1]], atol=0.05)
    random, _, _ = load_model(f"hf:{tmp_path}", "none")
    assert type(random) is type(ref)
    with pytest.raises(ModelLoadError, match="--pretrained only"):
        load_model(f"hf:{tmp_path}", "some_tag")


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, _, _ = load_model("timm:vit_tiny_patch16_224", "none")
    assert torch.equal(torch.rand(3), expected_next)
    b, _, _ = load_model("timm:vit_tiny_patch16_224", "none")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
