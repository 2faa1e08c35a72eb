"""The drift guard (``LeWrapper(..., verify=True)``, legrad.adapters.drift): unmodified models of every
family wrap and explain; a block whose ``forward`` changed (on the instance, or on the class as a new
upstream release would) is refused with one clear line; ``verify=False`` lets it through; wrapping
costs at most 3 plain forwards and writes nothing. Also: re-wrapping keeps or replaces each setting."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers.models import make_tiny_vit, rand_image, unit_text
from helpers.tiny_towers import build_tiny, same_bits
from torch.utils.flop_counter import FlopCounterMode

from legrad import LeWrapper
from legrad.adapters.drift import DriftError, check_drift, tolerance
from legrad.engine.targets import Logits

transformers = pytest.importorskip("transformers")
from helpers import hf_models  # noqa: E402  (needs transformers)

TIMM_TINY = dict(pretrained=False, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=10)


def timm_vit(**extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", **{**TIMM_TINY, **extra}).eval()


def torchvision_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=10).eval()


def _blocks(kind: str, model: torch.nn.Module) -> torch.nn.ModuleList:
    return {"open_clip": lambda: model.visual.transformer.resblocks, "timm": lambda: model.blocks,
            "hf_clip": lambda: model.vision_model.encoder.layers}[kind]()


BUILDERS = {
    "open_clip": lambda: make_tiny_vit("vit-p8"),
    "timm": timm_vit,
    "hf_clip": lambda: hf_models.make_model("clip"),
}
UNMODIFIED = {
    **BUILDERS,
    "open_clip_coca": lambda: build_tiny("coca_ViT-B-32"),
    "open_clip_timm_siglip": lambda: build_tiny("ViT-B-16-SigLIP"),
    "torchvision": torchvision_vit,
    "hf_siglip": lambda: hf_models.make_model("siglip"),
    "hf_siglip2": lambda: hf_models.make_model("siglip2"),
    "hf_vit_classifier": lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
        patch_size=8, num_labels=5)).eval(),
}


def _explain(wrapper: LeWrapper) -> torch.Tensor:
    adapter = wrapper.adapter
    if isinstance(adapter.readout_space, Logits):
        return wrapper.compute_legrad(image=rand_image(1, 32, 32), target=[1, 2])
    text = unit_text(2, adapter.embed_dim)
    if adapter.variable_grids:
        return wrapper.compute_legrad(text, image=hf_models.naflex_batch([(2, 3)], max_patches=8))[0][None]
    ph, pw = adapter.patch_size
    return wrapper.compute_legrad(text, image=rand_image(1, 3 * ph, 3 * pw))


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "tensors": {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]},
        "modes": {k: m.training for k, m in model.named_modules()},
        "grads": [k for k, p in model.named_parameters() if p.grad is not None],
        "dicts": {k: sorted(m.__dict__) for k, m in model.named_modules()},
    }


def _assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, t in before["tensors"].items():
        assert same_bits(after["tensors"][k], t), k
    assert after["modes"] == before["modes"] and after["dicts"] == before["dicts"] and after["grads"] == []


# ------------------------------------------------------------------------------------------- unmodified
@pytest.mark.parametrize("kind", sorted(UNMODIFIED))
def test_unmodified_models_wrap_explain_and_stay_untouched(kind):
    model = UNMODIFIED[kind]()
    before = _snapshot(model)
    calls = []
    handles = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in model.modules()]
    wrapper = LeWrapper(model, apply_correction=False)
    for h in handles:
        h.remove()
    assert calls == []  # the check runs on an eval-mode view of the model: none of the user's hooks fire
    maps = _explain(wrapper)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    _assert_untouched(model, before)


def test_a_model_in_training_mode_is_checked_deterministically_and_keeps_its_mode():
    # Dropout and drop-path everywhere, and a BatchNorm stem (MobileCLIP-B): the model's own forward in train mode
    # would be random and would update the BatchNorm statistics; the guard runs it on an eval-mode view.
    model = timm_vit(drop_rate=0.5, attn_drop_rate=0.5, proj_drop_rate=0.5, drop_path_rate=0.5).train()
    stem = build_tiny("MobileCLIP-B").train()
    for m in (model, stem):
        before = _snapshot(m)
        for _ in range(2):
            LeWrapper(m)
        _assert_untouched(m, before)
        assert all(mod.training for mod in m.modules())
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in stem.modules())


def test_families_without_own_output_are_not_checked(caplog):
    from legrad.adapters.base import TowerAdapter

    class Custom(TowerAdapter):  # a user family that declares no own_output
        family = "custom test family"

        def trace_tokens(self, image, compute_dtype):  # where legrad's re-run of this family would start
            raise AssertionError("not called")

    model = make_tiny_vit()
    with caplog.at_level("INFO", logger="legrad.adapters.drift"):
        check_drift(Custom(model.visual), model)
    assert "custom test family: no own_output" in caplog.text
    with pytest.raises(TypeError, match="the custom test family adapter has no own_output"):
        Custom(model.visual).own_output(model, None)


def test_meta_device_models_are_not_checked():
    LeWrapper(make_tiny_vit().to("meta"))  # nothing to compare against; compute_legrad refuses it later


# ------------------------------------------------------------------------------------------- drifted blocks
def _shift(out):
    """Adds a channel ramp (a constant would vanish in the next LayerNorm) to a block's output."""
    if isinstance(out, tuple):
        return (_shift(out[0]), *out[1:])
    return out + 0.1 * torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)


def _check_refused(model: torch.nn.Module, library: str) -> None:
    with pytest.raises(DriftError) as info:
        LeWrapper(model)
    msg = str(info.value)
    assert "\n" not in msg
    adapter = LeWrapper(model, verify=False).adapter  # verify=False lets it through
    for part in (adapter.family, f"torch {torch.__version__}", f"{library} ", "differs from the model's own forward",
                 "LeWrapper(model, verify=False)", "at your own risk"):
        assert part in msg, (part, msg)


LIBRARY = {"open_clip": "open_clip", "timm": "timm", "hf_clip": "transformers"}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_block_forward_changed_on_the_instance_is_refused(kind, monkeypatch):
    model = BUILDERS[kind]()
    blk = _blocks(kind, model)[0]
    original = blk.forward
    monkeypatch.setattr(blk, "forward", lambda *args, **kwargs: _shift(original(*args, **kwargs)))
    _check_refused(model, LIBRARY[kind])
    maps = _explain(LeWrapper(model, verify=False))
    assert torch.isfinite(maps).all()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_block_forward_changed_on_the_class_is_refused(kind, monkeypatch):
    model = BUILDERS[kind]()
    cls = type(_blocks(kind, model)[0])
    original = cls.forward

    def forward(self, *args, **kwargs):  # what a new release of the library could ship
        return _shift(original(self, *args, **kwargs))

    monkeypatch.setattr(cls, "forward", forward)
    _check_refused(model, LIBRARY[kind])
    monkeypatch.undo()
    LeWrapper(model)  # the same model passes once the class is back


def test_an_unverifiable_comparison_is_a_drift_error(monkeypatch):
    model = make_tiny_vit()
    monkeypatch.setattr(model, "encode_image", lambda *a, **k: torch.zeros(1, 5))
    with pytest.raises(DriftError, match=r"has shape \(1, 32\) where the model's own forward gives \(1, 5\)"):
        LeWrapper(model)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "encode_image", broken)
    with pytest.raises(DriftError, match=r"could not be compared \(RuntimeError: boom\)"):
        LeWrapper(model)


def test_drift_error_is_public():
    import legrad

    assert legrad.DriftError is DriftError and issubclass(DriftError, ValueError) and issubclass(DriftError, RuntimeError)


def test_tolerance_follows_the_dtype():
    cpu = torch.device("cpu")
    assert tolerance(torch.float32, cpu) == 1e-4
    assert tolerance(torch.float16, cpu) > tolerance(torch.float32, cpu)
    assert tolerance(torch.bfloat16, cpu) >= tolerance(torch.float16, cpu)


def test_half_precision_models_pass_and_small_differences_are_tolerated_only_within_the_dtype(monkeypatch):
    model = make_tiny_vit().to(torch.bfloat16)
    LeWrapper(model)  # bf16 rounding in the model's own forward stays within the bf16 tolerance
    model32 = make_tiny_vit()
    adapter = LeWrapper(model32).adapter
    with torch.no_grad():
        own = adapter.own_output(model32, adapter.probe_input())
    scale = float(own.abs().max())
    for rel, refused in ((3e-5, False), (3e-4, True)):
        monkeypatch.setattr(model32, "encode_image", lambda *a, _rel=rel, **k: own + _rel * scale)
        if refused:
            with pytest.raises(DriftError, match="tolerance 0.0001 relative for float32"):
                check_drift(adapter, model32)
        else:
            check_drift(adapter, model32)


# ------------------------------------------------------------------------------------------- cost
def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("kind", ["open_clip", "timm", "hf_clip"])
def test_wrapping_costs_at_most_three_plain_forwards(kind):
    model = BUILDERS[kind]()
    adapter = LeWrapper(model, verify=False).adapter
    image = adapter.probe_input()
    plain = {"open_clip": lambda: model.encode_image(image), "timm": lambda: model(image),
             "hf_clip": lambda: model.get_image_features(pixel_values=image)}[kind]
    with torch.no_grad():
        one_forward = _flops(plain)
    wrap = _flops(lambda: LeWrapper(model))
    assert one_forward > 0 and wrap <= 3 * one_forward, (wrap, one_forward)
    assert wrap > 1.5 * one_forward  # the check did run: the model's forward and legrad's re-run


def test_the_model_forward_runs_once_per_wrap_and_nothing_is_cached(monkeypatch):
    model = make_tiny_vit()
    calls = []
    original = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    LeWrapper(model)
    assert len(calls) == 1
    LeWrapper(model)
    LeWrapper(LeWrapper(model, verify=False))  # re-wrapping keeps verify=False unless given
    assert len(calls) == 2
    LeWrapper(LeWrapper(model, verify=False), verify=True)
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------- re-wrapping
SETTINGS = {  # name -> (inner value, explicit outer value), each unlike the default
    "layer_index": (1, -1),
    "tokenizer": ("inner-tokenizer", None),
    "empty_text_embedding": (torch.ones(32), None),
    "apply_correction": (False, True),
    "correction_threshold": (0.5, 0.9),
    "max_memory": (1e9, None),
    "max_tokens": (None, 16384),
}


def _setting(wrapper: LeWrapper, name: str):
    return getattr(wrapper, name)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_rewrapping_keeps_omitted_settings_and_an_explicit_argument_wins(name):
    inner_value, outer_value = SETTINGS[name]
    model = make_tiny_vit()
    inner = LeWrapper(model, **{name: inner_value})
    kept = LeWrapper(inner)
    replaced = LeWrapper(inner, **{name: outer_value})
    fresh = LeWrapper(model, **{name: outer_value})

    def same(a, b):
        return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b

    assert same(_setting(kept, name), _setting(inner, name))
    assert same(_setting(replaced, name), _setting(fresh, name))
    assert not same(_setting(replaced, name), _setting(inner, name))
    assert kept.model is model and replaced.model is model


def test_the_issue_example():
    inner = LeWrapper(make_tiny_vit(), max_tokens=None)
    assert LeWrapper(inner, max_tokens=16384).max_tokens == 16384
    assert LeWrapper(inner).max_tokens is None
    assert LeWrapper(LeWrapper(make_tiny_vit(), layer_index=1), layer_index=None).layer_index == -2


# ------------------------------------------------------------------------------------------- front ends
def _drifted_open_clip_blocks(monkeypatch) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    original = ResidualAttentionBlock.forward
    monkeypatch.setattr(ResidualAttentionBlock, "forward", lambda self, *a, **k: _shift(original(self, *a, **k)))


def test_the_cli_shows_a_drifted_model_as_one_line(tmp_path, monkeypatch, capsys):
    from helpers.frontend_utils import bundled_scenes

    from legrad.cli import main

    _drifted_open_clip_blocks(monkeypatch)  # the bundled demo model is an open_clip CLIP
    code = main(["explain", str(bundled_scenes()[0][0]), "-p", "a red circle", "--out", str(tmp_path / "out")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("legrad explain: error:") and "differs from the model's own forward" in err[0]
    assert "verify=False" in err[0] and not (tmp_path / "out").exists()


def test_legrad_bench_shows_a_drifted_model_as_one_line(monkeypatch, capsys):
    from legrad.cli import main

    _drifted_open_clip_blocks(monkeypatch)
    code = main(["bench", "--limit", "1", "--methods", "legrad", "--no-progress", "--no-perturbation"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 1 and len(err) == 1 and "differs from the model's own forward" in err[0], err


def test_the_front_ends_get_a_model_load_error(monkeypatch):
    from legrad.frontend.explainer import Explainer
    from legrad.io.errors import ModelLoadError

    _drifted_open_clip_blocks(monkeypatch)
    with pytest.raises(ModelLoadError, match=r"^toy: legrad's re-run of this open_clip .* at your own risk\.$") as info:
        Explainer.load("toy")
    assert isinstance(info.value.__cause__, DriftError) and "\n" not in str(info.value)
