"""The benchmark runner end to end: synthetic scenes, a user folder dataset, the command line."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from legrad.cli.bench import main
from legrad.eval import baselines
from legrad.eval.baselines import METHODS
from legrad.eval.benchmark import evaluate, format_table
from legrad.eval.datasets import FolderDataset, ToyScenes, preprocess_mask
from legrad.eval.metrics import miou, pointing_game
from legrad.methods import METHODS as REGISTRY
from legrad.methods import Method
from legrad.toy.model import ToyConfig, build_model, make_preprocess, make_tokenizer

torch.set_num_threads(1)

SMALL = ToyConfig(embed_dim=32, vision_width=64, vision_layers=2, vision_head_width=32, text_width=32,
                  text_heads=2, text_layers=1)


@pytest.fixture(scope="module")
def small_toy():
    """Random-init model with the demo model's architecture, shrunk; its preprocess and tokenizer."""
    torch.manual_seed(0)
    return build_model(SMALL).eval(), make_preprocess(SMALL), make_tokenizer(SMALL)


def test_toy_scenes_are_aligned(small_toy):
    _, preprocess, _ = small_toy
    scenes = ToyScenes(3, seed=7, preprocess=preprocess, size=64)
    sample = scenes[1]
    raw = scenes._scenes[1]
    assert sample.image.shape == (3, 64, 64) and sample.masks.dtype == torch.bool
    assert sample.prompts == [o.phrase for o in raw.objects]
    for o, m in zip(raw.objects, sample.masks):
        assert torch.equal(m, torch.from_numpy(o.mask))  # identity geometry at the native size


def test_evaluate_end_to_end(small_toy):
    model, preprocess, tokenizer = small_toy
    scenes = ToyScenes(3, seed=11, preprocess=preprocess, size=64)
    res = evaluate(model, tokenizer, scenes, layer_index=0, fractions=(0.0, 0.5), batch_size=5)
    n_pairs = sum(len(s.objects) for s in scenes._scenes)
    assert list(res) == list(METHODS)
    for name, s in res.items():
        assert s["pairs"] == n_pairs, name
        for key in ("pointing_game", "miou", "pixel_accuracy"):
            assert 0.0 <= s[key] <= 1.0, (name, key)
        assert math.isfinite(s["pos_auc"]) and math.isfinite(s["neg_auc"]) and s["seconds_per_image"] > 0
        assert set(s["pos_curve"]) == {"0", "0.5"}
    # Re-derive two numbers for one method straight from the public pieces.
    maps, masks = [], []
    for i in range(len(scenes)):
        sample = scenes[i]
        text = model.encode_text(tokenizer(sample.prompts), normalize=True).detach()
        maps.append(METHODS["gradcam"](model, text, sample.image[None])[0])
        masks.append(sample.masks)
    maps, masks = torch.cat(maps), torch.cat(masks)
    assert res["gradcam"]["pointing_game"] == pytest.approx(pointing_game(maps, masks).nanmean().item())
    assert res["gradcam"]["miou"] == pytest.approx(miou(maps, masks).item())
    # Unperturbed similarity is the same whatever the method.
    assert res["legrad"]["pos_curve"]["0"] == pytest.approx(res["rollout"]["neg_curve"]["0"])


def test_evaluate_skips_methods_the_model_cannot_run(small_toy, monkeypatch):
    model, preprocess, tokenizer = small_toy

    class Unsupported(Method):
        name = "unsupported"

        def maps(self, image, target, normalize, **call_options):
            raise NotImplementedError("no traced forward")

    monkeypatch.setitem(REGISTRY, "unsupported", Unsupported)
    res = evaluate(model, tokenizer, ToyScenes(1, 0, preprocess, 64), ["unsupported", "raw_attention", "legrad@-1"],
                   perturbation=False)
    assert res["legrad@-1"]["pairs"] == res["raw_attention"]["pairs"] > 0
    assert res["unsupported"]["error"] == "no traced forward" and math.isnan(res["unsupported"]["miou"])
    assert not math.isnan(res["raw_attention"]["miou"]) and math.isnan(res["raw_attention"]["pos_auc"])
    table = format_table(res)
    assert "| unsupported | n/a |" in table and table.count("\n") == 4
    scenes = ToyScenes(1, 0, preprocess, 64)
    with pytest.raises(ValueError, match="choose from"):
        evaluate(model, tokenizer, scenes, ["nope"])
    with pytest.raises(ValueError, match="'mean'"):
        evaluate(model, tokenizer, scenes, threshold="median")
    with pytest.raises(ValueError, match="increasing"):
        evaluate(model, tokenizer, scenes, fractions=(0.5, 0.1))
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, tokenizer, scenes, batch_size=0)
    with pytest.raises(ValueError, match="tolerance"):
        evaluate(model, tokenizer, scenes, pointing_tolerance=-1)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, tokenizer, [])


# ----------------------------------------------------------------------------- user dataset
def _tiny_openclip():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-16", pretrained=None, embed_dim=32,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=16),
        text_cfg=dict(width=32, heads=2, layers=1, context_length=8),
    )
    return model.eval(), preprocess


def _write_dataset(root):
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    entries = []
    for k in range(2):
        # 64 high, 96 wide: the preprocess resizes to 32x48 and centre-crops 8 columns on each side.
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        masks = []
        for j, (x0, x1) in enumerate([(36, 60), (60, 84)][: k + 1]):
            m = np.zeros((64, 96), np.uint8)
            m[16:48, x0:x1] = 255
            Image.fromarray(m).save(root / "masks" / f"{k}_{j}.png")
            masks.append({"mask": f"masks/{k}_{j}.png", "prompt": f"object {j}"})
        entries.append({"image": f"images/{k}.png", "masks": masks})
    (root / "prompts.json").write_text(json.dumps(entries))


def test_preprocess_mask_follows_resize_and_crop():
    _, preprocess = _tiny_openclip()
    m = np.zeros((64, 96), bool)
    m[16:48, 36:60] = True  # -> rows 8:24, cols 18:30 after resizing by 1/2, cols 10:22 after cropping 8
    got = preprocess_mask(preprocess, m)
    want = torch.zeros(32, 32, dtype=torch.bool)
    want[8:24, 10:22] = True
    assert got.shape == (32, 32)
    assert (got != want).sum() <= 2 * (16 + 12)  # at most the one-pixel border of the rectangle differs
    assert bool(got[10:22, 12:20].all()) and not bool(got[:6].any()) and not bool(got[:, 24:].any())


def test_folder_dataset_and_evaluate(tmp_path):
    _write_dataset(tmp_path)
    model, preprocess = _tiny_openclip()
    data = FolderDataset(tmp_path, preprocess)
    assert len(data) == 2
    sample = data[1]
    assert sample.image.shape == (3, 32, 32) and sample.masks.shape == (2, 32, 32)
    assert sample.prompts == ["object 0", "object 1"]
    res = evaluate(model, open_clip.get_tokenizer("ViT-B-16", context_length=8), data,
                   ["legrad", "chefercam"], layer_index=-1, fractions=(0.0, 0.3))
    assert res["legrad"]["pairs"] == 3 and res["chefercam"]["pairs"] == 3


def test_folder_dataset_errors(tmp_path):
    _, preprocess = _tiny_openclip()
    with pytest.raises(FileNotFoundError, match="not found"):
        FolderDataset(tmp_path / "missing", preprocess)
    with pytest.raises(FileNotFoundError, match="JSON file of prompts"):
        FolderDataset(tmp_path, preprocess)
    _write_dataset(tmp_path)
    bad = tmp_path / "bad.json"
    for content, match in [
        ("{not json", "not valid JSON"),
        ("[]", "non-empty list"),
        ('[{"image": "images/9.png", "masks": [{"mask": "masks/0_0.png", "prompt": "x"}]}]', "image .* not found"),
        ('[{"image": "images/0.png", "masks": []}]', "'masks' must be"),
        ('[{"image": "images/0.png", "masks": [{"mask": "masks/0_0.png"}]}]', "mask 0: expected"),
        ('[{"image": "images/0.png", "masks": [{"mask": "masks/nope.png", "prompt": "x"}]}]', "nope.png not found"),
    ]:
        bad.write_text(content)
        with pytest.raises(ValueError, match=match):
            FolderDataset(tmp_path, preprocess, annotations="bad.json")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "masks" / "small.png")
    bad.write_text('[{"image": "images/0.png", "masks": [{"mask": "masks/small.png", "prompt": "x"}]}]')
    with pytest.raises(ValueError, match="must have their image's size"):
        FolderDataset(tmp_path, preprocess, annotations="bad.json")[0]


# ----------------------------------------------------------------------------- command line
def test_cli_user_dataset(tmp_path, capsys):
    _write_dataset(tmp_path)
    out = tmp_path / "res.json"
    code = main(["--data", str(tmp_path), "--model", "ViT-S-32", "--pretrained", "none", "--methods", "legrad",
                 "rollout", "--no-perturbation", "--limit", "1", "--json", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| legrad |" in printed and "| rollout |" in printed and "1 images from" in printed
    payload = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert payload["config"]["images"] == 1 and payload["methods"]["legrad"]["pairs"] == 1
    assert payload["methods"]["rollout"]["pos_auc"] is None  # not measured (--no-perturbation)


@pytest.mark.slow
def test_cli_bundled_scenes(tmp_path, capsys):
    from legrad.toy import CHECKPOINT_PATH

    if not CHECKPOINT_PATH.is_file():
        pytest.skip("bundled demo checkpoint not built yet")
    out = tmp_path / "res.json"
    code = main(["--limit", "2", "--json", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    table = capsys.readouterr().out
    for name in METHODS:
        assert f"| {name} |" in table
    payload = json.loads(out.read_text())
    assert payload["config"]["images"] == 2 and set(payload["methods"]) == set(METHODS)


def test_cli_errors(tmp_path, capsys):
    assert main(["--methods", "legrad", "gradcam++"]) == 2
    assert "unknown method" in capsys.readouterr().err
    code = main(["--data", str(tmp_path / "nope"), "--model", "ViT-S-32", "--pretrained", "none", "--no-progress"])
    assert code == 1 and "not found" in capsys.readouterr().err
    assert main(["--limit", "0"]) == 2


def test_registered_as_legrad_subcommand(capsys):
    from legrad.cli import main as cli_main

    assert cli_main(["bench", "--methods", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err


# ----------------------------------------------------------------------------- image classifiers
def _write_class_dataset(root, prompts=((3, "tench"), ("7",))):
    """Images with one mask per class target: an index (int or digits) or a class name, under 'prompt' or 'class'."""
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    entries = []
    for k, targets in enumerate(prompts):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / f"{k}.png")
        masks = []
        for j, t in enumerate(targets):
            m = np.zeros((48, 64), np.uint8)
            m[8 + 10 * j : 30 + 10 * j, 12:44] = 255
            Image.fromarray(m).save(root / "masks" / f"{k}_{j}.png")
            masks.append({"mask": f"masks/{k}_{j}.png", ("class" if j else "prompt"): t})
        entries.append({"image": f"images/{k}.png", "masks": masks})
    (root / "prompts.json").write_text(json.dumps(entries))


def _tiny_timm_classifier():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, num_classes=10)
    with torch.no_grad():
        model.head.weight.normal_()
    return model.eval()


def _classifier_preprocess(image):
    import torchvision.transforms.functional as TF

    return TF.normalize(TF.to_tensor(TF.resize(image.convert("RGB"), [32, 32])), [0.5] * 3, [0.5] * 3)


def test_evaluate_classifier_class_indices(tmp_path):
    """Class-index prompts without labels; the perturbation AUC is re-derived from the target logits."""
    from legrad.eval.metrics import perturb, perturbation_auc

    _write_class_dataset(tmp_path, prompts=((3, "5"), (7,)))
    model = _tiny_timm_classifier()
    data = FolderDataset(tmp_path, _classifier_preprocess)
    assert data[0].prompts == ["3", "5"] and data.prompt_lists()[1] == ("images/1.png", ["7"])
    fr = (0.0, 0.5)
    res = evaluate(model, None, data, fractions=fr)
    assert list(res) == list(METHODS)
    for name in ("legrad", "raw_attention", "rollout", "gradcam", "chefercam"):
        s = res[name]
        assert s["pairs"] == 3 and "error" not in s, name
        assert all(math.isfinite(s[k]) for k in ("pointing_game", "miou", "pixel_accuracy", "pos_auc", "neg_auc"))
    # gradcam's positive AUC straight from the public pieces and the model's own logits.
    aucs = []
    for i, classes in enumerate(([3, 5], [7])):
        sample = data[i]
        image = sample.image[None]
        maps = baselines.gradcam(model, image=image, target=classes)
        with torch.no_grad():
            curve = torch.tensor([[float(model(perturb(image, maps, f)[0, p][None])[0, c]) for f in fr]
                                  for p, c in enumerate(classes)], dtype=torch.float64)
        aucs.extend(perturbation_auc(curve, fr).tolist())
    assert res["gradcam"]["pos_auc"] == pytest.approx(sum(aucs) / len(aucs), abs=1e-5)


def test_evaluate_classifier_bad_class_fails_before_any_work(tmp_path, monkeypatch):
    from legrad.frontend.classifier_models import ClassLabels

    _write_class_dataset(tmp_path, prompts=((3,), ("dog",)))
    model = _tiny_timm_classifier()
    data = FolderDataset(tmp_path, _classifier_preprocess)
    monkeypatch.setattr(FolderDataset, "__getitem__", lambda self, i: pytest.fail("an image was loaded"))
    with pytest.raises(ValueError, match=r"images/1.png: 'dog' is not a class index"):
        evaluate(model, None, data)
    with pytest.raises(ValueError, match="images/1.png: this model has no class names"):
        evaluate(model, ClassLabels(10), data)
    with pytest.raises(ValueError, match="images/1.png: unknown class name 'dog'"):
        evaluate(model, ClassLabels(10, [f"class{i}, cat{i}" for i in range(10)]), data)


def test_cli_classifier_end_to_end(tmp_path, capsys):
    """``legrad bench --model timm:test_vit --pretrained none --dataset DIR``: every method, finite numbers."""
    _write_class_dataset(tmp_path)
    out = tmp_path / "res.json"
    code = main(["--dataset", str(tmp_path), "--model", "timm:test_vit", "--pretrained", "none", "--json", str(out),
                 "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    table = capsys.readouterr().out
    assert "3 (image, class, mask) pairs" in table
    payload = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert payload["config"]["perturbation_score"] == "target logit"
    assert set(payload["methods"]) == set(METHODS)
    for name in METHODS:
        assert f"| {name} |" in table
        s = payload["methods"][name]
        assert s["pairs"] == 3, name
        for key in ("pointing_game", "miou", "pixel_accuracy", "pos_auc", "neg_auc", "seconds_per_image"):
            assert isinstance(s[key], float) and math.isfinite(s[key]), (name, key)


def test_cli_classifier_needs_a_dataset_and_known_classes(tmp_path, capsys):
    assert main(["--model", "timm:test_vit", "--pretrained", "none", "--no-progress"]) == 2
    assert "give --data DIR" in capsys.readouterr().err
    _write_class_dataset(tmp_path, prompts=((3, "not a class name"),))
    code = main(["--data", str(tmp_path), "--model", "timm:test_vit", "--pretrained", "none", "--no-progress",
                 "--json", "-", "--device", "cpu"])
    assert code == 1 and "unknown class name 'not a class name'" in capsys.readouterr().err
