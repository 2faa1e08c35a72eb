"""Model folders loaded by the front ends (``hf:DIR``): their code is never run, whatever stdin says, and a
checkpoint lacking a tensor is refused instead of silently randomised (issue 26, item 4)."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch
from helpers.frontend_utils import PYTHON, REPO, subprocess_env
from PIL import Image

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from legrad.frontend.hf_checks import (  # noqa: E402
    CustomCodeError,
    MissingWeightsError,
    refuse_missing_weights,
)
from legrad.frontend.models import load_model  # noqa: E402
from legrad.io.errors import ModelLoadError  # noqa: E402


def _custom_code_folder(root, marker, architectures=("EvilModel",)):
    """A folder whose config.json maps an unknown model_type to the folder's own code, which writes ``marker``
    when it is imported."""
    folder = root / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "legrad_test_custom_code", "architectures": list(architectures),
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"},
    }))
    (folder / "evil.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("the folder's code ran")
        from transformers import PretrainedConfig, PreTrainedModel

        class EvilConfig(PretrainedConfig):
            model_type = "legrad_test_custom_code"

        class EvilModel(PreTrainedModel):
            config_class = EvilConfig
    """))
    return folder


def _env(tmp_path):
    # transformers copies a folder's code into HF_MODULES_CACHE before importing it: keep that in the test's folder.
    return {**subprocess_env(), "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}


@pytest.mark.subprocess
def test_custom_code_in_a_model_folder_is_never_run_even_when_stdin_says_yes(tmp_path):
    marker = tmp_path / "ran.txt"
    folder = _custom_code_folder(tmp_path, marker)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "img.png")
    # The control: transformers' default asks on the terminal, and a piped "y" runs the folder's code.
    control = subprocess.run(
        [PYTHON, "-c", f"import transformers; transformers.AutoConfig.from_pretrained({str(folder)!r})"],
        input="y\n", capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=tmp_path)
    assert marker.exists(), control.stderr[-2000:]
    marker.unlink()
    out = subprocess.run([PYTHON, "-m", "legrad", "explain", str(tmp_path / "img.png"), "--model", f"hf:{folder}",
                          "--target", "0", "--out", str(tmp_path / "out")],
                         input="y\ny\ny\n", capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=REPO)
    assert not marker.exists()
    assert out.returncode != 0
    assert str(folder) in out.stderr and "code is not run" in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "[y/N]" not in out.stdout + out.stderr


def test_custom_code_is_refused_by_every_front_end_loader(tmp_path, monkeypatch):
    from legrad.frontend.vlm import VLMExplainer

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run the code"))
    marker = tmp_path / "ran.txt"
    folder = _custom_code_folder(tmp_path, marker, architectures=("LlavaForConditionalGeneration",))
    for load in (lambda: load_model(f"hf:{folder}", None, "cpu"), lambda: VLMExplainer.load(f"hf:{folder}", "cpu")):
        with pytest.raises(CustomCodeError, match="code is not run") as info:
            load()
        assert str(folder) in str(info.value)
        assert isinstance(info.value, ValueError) and isinstance(info.value, ModelLoadError)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ missing tensors
def _drop(folder, pick) -> str:
    """Removes one tensor (the first key ``pick`` accepts) from the folder's model.safetensors; returns its key."""
    path = folder / "model.safetensors"
    state = load_file(path)
    key = next(k for k in state if pick(k))
    del state[key]
    save_file(state, path, metadata={"format": "pt"})
    return key


def test_a_classifier_folder_lacking_a_tensor_is_refused(tmp_path):
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    model, _, _ = load_model(f"hf:{tmp_path}", None, "cpu")  # the control: the complete folder loads
    assert model is not None
    _drop(tmp_path, lambda k: "layer.1" in k and "query.weight" in k)
    with pytest.raises(MissingWeightsError, match=r"lacks 1 tensor\(s\)") as info:
        load_model(f"hf:{tmp_path}", None, "cpu")
    message = str(info.value)
    assert str(tmp_path) in message and "random" in message and "--pretrained none" in message
    # Named as transformers names the model's tensor (its own layout: ``layers.1`` / ``q_proj``, or the saved one).
    assert "1" in message and ("q_proj" in message or "query" in message), message
    random, _, _ = load_model(f"hf:{tmp_path}", "none", "cpu")  # an explicitly random model is still allowed
    assert random is not None


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    import helpers.vlm_models as V

    root = tmp_path_factory.mktemp("llava")
    processor = transformers.LlavaProcessor(
        image_processor=transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                                        crop_size={"height": 32, "width": 32}),
        tokenizer=V.tokenizer(), patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
        num_additional_image_tokens=1)
    V.llava().save_pretrained(root)
    processor.save_pretrained(root)
    return root


def test_a_vlm_folder_lacking_a_tensor_is_refused(llava_folder, tmp_path):
    import shutil

    from legrad.frontend.vlm import VLMExplainer

    folder = tmp_path / "llava"
    shutil.copytree(llava_folder, folder)
    assert VLMExplainer.load(f"hf:{folder}", "cpu").wrapper is not None  # the control
    _drop(folder, lambda k: "vision_tower" in k and "layers.2" in k and "fc1.weight" in k)
    with pytest.raises(MissingWeightsError, match="fc1") as info:
        VLMExplainer.load(f"hf:{folder}", "cpu")
    assert str(folder) in str(info.value)


def test_tied_weights_are_not_missing_weights():
    """An ``lm_head`` tied to the input embeddings is not stored; reported missing or not, it is loaded."""
    import helpers.vlm_models as V

    model = V.paligemma()
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    refuse_missing_weights(model, {"missing_keys": {"lm_head.weight"}}, "hf:x", "x")  # tied: accepted
    with pytest.raises(MissingWeightsError, match="multi_modal_projector"):
        refuse_missing_weights(model, {"missing_keys": {"lm_head.weight", "model.multi_modal_projector.linear.weight"}},
                               "hf:x", "x")


def test_a_saved_tied_vlm_loads(tmp_path):
    import helpers.vlm_models as V

    model = V.paligemma()
    model.save_pretrained(tmp_path)
    assert not any("lm_head" in k for k in load_file(tmp_path / "model.safetensors"))  # tied: not stored
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True, trust_remote_code=False)
    refuse_missing_weights(loaded, info, "hf:x", str(tmp_path))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_transformers_own_refusal_is_reworded(tmp_path, monkeypatch):
    """Custom code the folder check does not see (e.g. a Hub repository) is refused by
    ``trust_remote_code=False`` inside transformers; its ValueError becomes the same clear error."""
    from legrad.frontend.hf_checks import custom_code_error

    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked whether to run the code"))
    marker = tmp_path / "ran.txt"
    folder = _custom_code_folder(tmp_path, marker)
    with pytest.raises(ValueError, match="trust_remote_code") as info:
        transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    error = custom_code_error(info.value, f"hf:{folder}")
    assert isinstance(error, CustomCodeError) and "code is not run" in str(error) and str(folder) in str(error)
    assert custom_code_error(ValueError("some other problem"), "hf:x") is None
    assert not marker.exists()


def test_every_front_end_load_passes_trust_remote_code_false(tmp_path, llava_folder, monkeypatch):
    from legrad.frontend.vlm import VLMExplainer

    calls: list[tuple[str, object, int]] = []
    depth = [0]  # calls made inside a recorded call are transformers' own
    for cls in (transformers.AutoConfig, transformers.AutoModelForImageClassification,
                transformers.AutoImageProcessor, transformers.AutoProcessor, transformers.LlavaForConditionalGeneration):
        for method in ("from_pretrained", "from_config"):
            if not hasattr(cls, method):
                continue
            original = getattr(cls, method).__func__

            def recording(klass, *args, _original=original, _name=f"{cls.__name__}.{method}", **kwargs):
                calls.append((_name, kwargs.get("trust_remote_code", "not given"), depth[0]))
                depth[0] += 1
                try:
                    return _original(klass, *args, **kwargs)
                finally:
                    depth[0] -= 1

            monkeypatch.setattr(cls, method, classmethod(recording))
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, num_labels=2)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    load_model(f"hf:{tmp_path}", None, "cpu")
    load_model(f"hf:{tmp_path}", "none", "cpu")
    VLMExplainer.load(f"hf:{llava_folder}", "cpu")
    own = [(name, value) for name, value, level in calls if level == 0]
    assert {name for name, _ in own} == {
        "AutoConfig.from_pretrained", "AutoModelForImageClassification.from_pretrained",
        "AutoModelForImageClassification.from_config", "AutoImageProcessor.from_pretrained",
        "AutoProcessor.from_pretrained", "LlavaForConditionalGeneration.from_pretrained"}, own
    # The front ends' own calls say False (transformers' inner calls inherit it or use their local classes).
    assert all(value is False for _, value in own), own
