"""Gradient baselines, one map per prompt: :class:`GradCAM` and :class:`CheferCAM`.

Both differentiate the target's score of the model's real readout (image embedding, a classifier's
logits) through the whole tower (:meth:`~legrad.adapters.base.TowerAdapter.trace`), with
``ds/dA = (ds/dO) V^T`` as in LeGrad.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..engine.step import LayerStep
from .attention import patch_columns, readout_row, require_self_attention
from .base import BaselineMethod, Run
from .targets import Target

__all__ = ["GradCAM", "CheferCAM"]

#: Elements of one ``[B, H, block, N]`` CheferCAM block (16 MiB in float32).
CHEFER_BLOCK_ELEMENTS = 4 * 2**20


def _traced_gradients(run: Run, wanted: Callable[[list[LayerStep]], list[torch.Tensor]]):
    """Yields ``(p, steps, grads)`` per prompt: gradients of ``s[:, p]`` w.r.t. ``wanted(steps)``."""
    steps, embedding = run.adapter.trace(run.image, run.dtype)
    targets = wanted(steps)
    with torch.enable_grad():
        # Summing over the batch is exact: each image's score depends only on that image.
        totals = run.scores(embedding).sum(0).unbind()  # P scalars, indexed with grad enabled
    for p in range(run.prompts):
        grads = torch.autograd.grad(totals[p], targets, retain_graph=p < run.prompts - 1)
        yield p, steps, grads



class GradCAM(BaselineMethod):
    """GradCAM (Selvaraju et al., 2017) on the last block's tokens ``T`` ``[N, C]`` (its attention input,
    after the pre-norm): ``w_c = mean_n ds/dT[n, c]`` over patch tokens, ``map[n] = relu(sum_c w_c T[n, c])``."""

    name = "gradcam"

    def maps(self, image: Any, target: Target, normalize: bool, **call_options: Any) -> torch.Tensor:
        self.no_call_options(call_options)
        run = Run(self.wrapper, image, target)
        rel = torch.zeros(run.batch, run.prompts, run.grid[0] * run.grid[1], dtype=run.dtype,
                          device=run.image.device)
        with torch.inference_mode(False), torch.no_grad():
            def last_block_tokens(steps):
                if getattr(steps[-1], "tokens", None) is None:  # a TracedStep's, where the family gives them
                    raise NotImplementedError(f"the {run.adapter.family} adapter's trace gives no block tokens")
                return [steps[-1].tokens]

            for p, steps, (grad,) in _traced_gradients(run, last_block_tokens):
                last = steps[-1]
                pre = last.num_prefix_tokens
                tokens = last.tokens.detach()
                weights = grad[:, pre:].mean(1)  # [B, C]
                cam = (tokens[:, pre:] * weights[:, None, :]).sum(-1).clamp_min(0)  # [B, Nk - pre]
                if last.key_mask is not None:
                    cam = cam * last.key_mask[:, pre:].to(cam.dtype)
                rel[:, p] = cam
        return run.finish(rel, normalize)


def _gradient_weighted_attention(step: LayerStep, d_out: torch.Tensor) -> torch.Tensor:
    """``E_h[relu(ds/dA * A)]`` ``[B, N, N]`` (float64), built in blocks of query rows.

    ``ds/dA = (ds/dO) V^T`` and ``A`` are both row-wise, so a block of rows needs only
    ``[B, H, block, N]`` at a time instead of several ``[B, H, N, N]`` tensors.
    """
    b, h, n, _ = d_out.shape
    v_t = step.value.to(d_out.dtype).transpose(-1, -2)
    out = torch.empty(b, n, v_t.shape[-1], dtype=torch.float64, device=d_out.device)
    block = max(1, min(n, CHEFER_BLOCK_ELEMENTS // max(b * h * v_t.shape[-1], 1)))
    for q0 in range(0, n, block):
        rows = slice(q0, min(n, q0 + block))
        grad_attn = d_out[:, :, rows] @ v_t  # [B, H, block, N]
        out[:, rows] = (grad_attn * step.probs(rows).to(d_out.dtype)).clamp_min(0).mean(1).to(torch.float64)
    return out


class CheferCAM(BaselineMethod):
    """CheferCAM (Chefer, Gur & Wolf, 2021): ``R = I``; per block ``R <- R + E_h[relu(ds/dA_l * A_l)] R``;
    map ``R[cls, patches]``.

    Options:
        start_layer: first block used (negative counts from the end); 0 = all blocks.
    """

    name = "chefercam"
    options = {"start_layer": 0}
    first_block = "start_layer"

    def maps(self, image: Any, target: Target, normalize: bool, **call_options: Any) -> torch.Tensor:
        self.no_call_options(call_options)
        run = Run(self.wrapper, image, target)
        depth = run.adapter.depth
        start = self.start_block(depth)
        if run.adapter.uses_attention_pooler:
            raise NotImplementedError(
                f"CheferCAM reads the pooled token's row of the rollout, which the {run.adapter.family} tower "
                "does not have (it pools with attention); use legrad, gradcam or raw_attention for this model"
            )
        rel = torch.zeros(run.batch, run.prompts, run.grid[0] * run.grid[1], dtype=torch.float64,
                          device=run.image.device)
        with torch.inference_mode(False), torch.no_grad():
            for p, steps, grads in _traced_gradients(run, lambda steps: [s.out for s in steps[start:]]):
                used = steps[start:]
                r = None
                for step, d_out in zip(used, grads):
                    require_self_attention(run, step, "CheferCAM")
                    abar = _gradient_weighted_attention(step, d_out)
                    if r is None:
                        r = torch.eye(abar.shape[-1], dtype=abar.dtype, device=abar.device).expand(run.batch, -1, -1)
                    r = r + abar @ r
                rel[:, p] = patch_columns(used[-1], readout_row(run.adapter, r, used[-1].num_prefix_tokens))
        return run.finish(rel, normalize)
