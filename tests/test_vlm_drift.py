"""The drift guard on VLMs: at wrap, legrad's re-run of the vision tower and the family's feature path is
compared with the model's own ``get_image_features``; a vision block whose forward changed (on the instance or
on the class) is refused with ``DriftError``, ``verify=False`` lets it through, and the check writes nothing."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import vlm_models as V  # noqa: E402
from helpers.tiny_towers import same_bits  # noqa: E402

from legrad import LeWrapper  # noqa: E402
from legrad.adapters.drift import DriftError  # noqa: E402

FAMILIES = {"llava": V.llava, "llava_next": V.llava_next, "paligemma": V.paligemma}


def _shift(out):
    """Adds a channel ramp (a constant would vanish in the next LayerNorm) to a block's output."""
    if isinstance(out, tuple):
        return (_shift(out[0]), *out[1:])
    return out + 0.1 * torch.linspace(-1.0, 1.0, out.shape[-1], dtype=out.dtype)


def _first_block(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower).encoder.layers[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unmodified_vlms_pass_and_are_left_intact(family):
    model = FAMILIES[family]()
    # The model's own output capture (hidden_states via transformers' hooks) has run once before the wrap.
    with torch.no_grad():
        model.get_image_features(**LeWrapper(model, verify=False).adapter.probe_input())
    before, hooks = V.snapshot(model), V.hooks(model)
    LeWrapper(model)
    assert all(same_bits(before[k], v) for k, v in V.snapshot(model).items())
    assert V.hooks(model) == hooks


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("where", ["instance", "class"])
def test_a_changed_vision_block_is_refused(family, where, monkeypatch):
    model = FAMILIES[family]()
    blk = _first_block(model)
    if where == "instance":
        original = blk.forward
        monkeypatch.setattr(blk, "forward", lambda *args, **kwargs: _shift(original(*args, **kwargs)))
    else:
        cls_forward = type(blk).forward
        monkeypatch.setattr(type(blk), "forward", lambda self, *a, **k: _shift(cls_forward(self, *a, **k)))
    with pytest.raises(DriftError) as info:
        LeWrapper(model)
    msg = str(info.value)
    assert "\n" not in msg and "differs from the model's own forward" in msg and "transformers 5" in msg
    assert LeWrapper(model, verify=False).adapter.family in msg
    monkeypatch.undo()
    LeWrapper(model)  # the same model passes once the block is back
