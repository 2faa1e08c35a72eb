"""The toolkits people evaluate with, run for real on random-init tiny models: Quantus metrics with
:func:`legrad.interop.quantus_explain`, captum's ``sensitivity_max`` and ``infidelity`` with
``Method.attribute``, and our GradCAM against pytorch-grad-cam's on a timm ViT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.tiny_towers import build_tiny, random_text
from test_baselines_classifiers import make_timm

from legrad.interop import quantus_explain
from legrad.methods import GradCAM, LeGrad, make_method

torch.set_num_threads(1)


def _images(batch: int = 2, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)


def test_quantus_explain_contract():
    model = make_timm("token")
    x = _images().numpy()
    maps = quantus_explain(model, x, np.array([3, 5]), method="gradcam")
    assert maps.shape == (2, 1, 32, 32) and maps.dtype == np.float32
    want = GradCAM(model).attribute(torch.from_numpy(x), target=torch.tensor([[3], [5]]))
    np.testing.assert_array_equal(maps, want.numpy())
    clip = build_tiny("ViT-B-32").double()
    text = random_text(4, 32).double()
    maps = quantus_explain(clip, x, np.array([2, 0]), text_embedding=text)
    want = LeGrad(clip).attribute(torch.from_numpy(x), target=text[[2, 0]][:, None])
    np.testing.assert_array_equal(maps, want.numpy())
    with pytest.raises(ValueError, match="one int per image"):
        quantus_explain(model, x, np.array([3]))
    with pytest.raises(TypeError, match="text_embedding"):
        quantus_explain(clip, x, np.array([1, 2]))
    with pytest.raises(ValueError, match="rows of text_embedding"):
        quantus_explain(clip, x, np.array([1, 9]), text_embedding=text)


def test_quantus_metrics_run_with_it():
    quantus = pytest.importorskip("quantus")
    model = make_timm("token").float()
    x = _images(4, torch.float32).numpy()
    with torch.no_grad():
        y = model(torch.from_numpy(x)).argmax(-1).numpy()
    kwargs = dict(model=model, x_batch=x, y_batch=y, a_batch=None, explain_func=quantus_explain, device="cpu")
    for method in ("legrad", "gradcam"):
        kw = dict(kwargs, explain_func_kwargs={"method": method})
        sparsity = quantus.Sparseness(disable_warnings=True)(**kw)
        faith = quantus.FaithfulnessCorrelation(nr_runs=5, subset_size=16, perturb_baseline="black",
                                                disable_warnings=True)(**kw)
        sens = quantus.MaxSensitivity(nr_samples=2, lower_bound=0.05, disable_warnings=True)(**kw)
        assert len(sparsity) == len(sens) == 4
        for scores in (sparsity, faith, sens):  # FaithfulnessCorrelation aggregates over the batch
            assert len(scores) >= 1 and np.all(np.isfinite(scores)), (method, scores)
        # Sparseness (a Gini index) of the very maps quantus_explain returns, computed here
        a = quantus_explain(model, x, y, method=method).reshape(4, -1).astype(np.float64)
        a = np.sort(np.abs(a) + 1e-7, axis=1)
        n = a.shape[1]
        k = np.arange(1, n + 1)
        gini = ((2 * k - n - 1) * a).sum(1) / (n * a.sum(1))
        np.testing.assert_allclose(sparsity, gini, rtol=1e-4)


def test_captum_sensitivity_max_and_infidelity():
    metrics = pytest.importorskip("captum.metrics")
    model = make_timm("token").float()
    x = _images(2, torch.float32)
    method = make_method("gradcam", model)
    target = torch.tensor([[3], [5]])  # [B, 1]: captum repeats per-example targets along the batch
    sens = metrics.sensitivity_max(method.attribute, x, target=target, n_perturb_samples=3, perturb_radius=0.05)
    assert sens.shape == (2,) and bool(torch.isfinite(sens).all()) and bool((sens >= 0).all())
    # zero perturbation radius: the same maps, sensitivity 0
    zero = metrics.sensitivity_max(method.attribute, x, target=target, n_perturb_samples=2, perturb_radius=0.0)
    torch.testing.assert_close(zero, torch.zeros(2))

    def perturb(inputs):
        noise = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(0)) * 0.1
        return noise, inputs - noise

    def logit(inputs, target_index):
        return model(inputs).gather(1, target_index[:, None]).squeeze(1)

    attributions = method.attribute(x, target=target, normalize=False).expand_as(x)
    infid = metrics.infidelity(logit, perturb, x, attributions, additional_forward_args=(target[:, 0],),
                               n_perturb_samples=4)
    # captum's definition, computed here: E[(sum(I * attr) - (f(x) - f(x - I)))^2]
    noise, _ = perturb(x.repeat_interleave(4, 0))
    with torch.no_grad():
        diff = logit(x, target[:, 0]).repeat_interleave(4) - logit(x.repeat_interleave(4, 0) - noise,
                                                                   target[:, 0].repeat_interleave(4))
    dot = (noise * attributions.repeat_interleave(4, 0)).flatten(1).sum(1)
    want = ((dot - diff) ** 2).reshape(2, 4).mean(1)
    torch.testing.assert_close(infid, want, rtol=1e-3, atol=1e-5)


def test_gradcam_equals_pytorch_grad_cam_on_a_timm_vit():
    grad_cam = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = make_timm("token")
    x = _images(2)
    grid = (4, 4)

    def reshape(t):  # [B, 1 + N, C] -> [B, C, gh, gw], prefix token dropped (pytorch-grad-cam's ViT recipe)
        return t[:, 1:].reshape(t.shape[0], *grid, t.shape[-1]).permute(0, 3, 1, 2)

    # our GradCAM's activations are the last block's attention input, after its pre-norm: norm1
    cam = grad_cam.GradCAM(model=model, target_layers=[model.blocks[-1].norm1], reshape_transform=reshape)
    theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3), ClassifierOutputTarget(5)])  # [B, H, W]
    ours = GradCAM(model).attribute(x, target=torch.tensor([[3], [5]]))[:, 0]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    assert float(np.abs(theirs).max()) > 0
