"""``torch.compile``'d models given to LeWrapper (and the baselines) are unwrapped to their original module:
nothing legrad does traces or compiles them, and the model is left bitwise intact (issue 26, item 8)."""

from __future__ import annotations

import pytest
import torch
from helpers.models import make_tiny_vit, rand_image, unit_text

from legrad import LeWrapper
from legrad.adapters.registry import is_compiled, unwrap_compiled


def _compiled(model, calls: list):
    """``torch.compile`` with a recording backend: ``calls`` grows whenever anything gets compiled."""

    def backend(graph_module, example_inputs):
        calls.append(graph_module)
        return graph_module.forward

    return torch.compile(model, backend=backend)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def test_a_compiled_model_is_unwrapped_and_nothing_is_compiled():
    torch._dynamo.reset()
    model = make_tiny_vit().train()  # training mode too: the wrapper must not change it
    before = _snapshot(model)
    calls: list = []
    compiled = _compiled(model, calls)
    assert is_compiled(compiled) and unwrap_compiled(compiled) is model and unwrap_compiled(model) is model

    wrapper = LeWrapper(compiled)  # the drift guard runs here (verify=True by default)
    assert wrapper.model is model
    text, image = unit_text(2), rand_image(1, 32, 32)
    maps, _, scores = wrapper.compute_legrad(text, image=image, return_scores=True)
    expected = LeWrapper(model).compute_legrad(text, image=image)
    assert torch.equal(maps, expected)
    with torch.no_grad():
        own = torch.nn.functional.normalize(model.eval().encode_image(image), dim=-1) @ text.T
    model.train()
    assert torch.allclose(scores, own, atol=1e-5)
    assert calls == []  # nothing was traced or compiled
    assert model.training and not model._forward_hooks and not model._forward_pre_hooks
    after = model.state_dict(keep_vars=True)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k].detach()) and before[k].dtype == after[k].dtype for k in before)


def test_baselines_take_a_compiled_model_too():
    from legrad.eval.baselines import raw_attention

    torch._dynamo.reset()
    model = make_tiny_vit()
    calls: list = []
    text, image = unit_text(2), rand_image(1, 32, 32)
    assert torch.equal(raw_attention(_compiled(model, calls), text, image), raw_attention(model, text, image))
    assert calls == []


def test_the_recording_backend_does_see_a_compilation():
    """The control of the tests above: calling the compiled module itself does compile (so ``calls`` can fail)."""
    torch._dynamo.reset()
    calls: list = []
    compiled = _compiled(make_tiny_vit().visual, calls)
    compiled(rand_image(1, 32, 32))
    assert calls


def test_a_compiled_submodule_is_refused_with_a_message_saying_so():
    model = make_tiny_vit()
    model.visual = torch.compile(model.visual)
    with pytest.raises(TypeError, match=r"'visual' is a torch.compile'd module.*_orig_mod"):
        LeWrapper(model)
