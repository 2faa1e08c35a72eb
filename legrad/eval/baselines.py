"""Baseline explainability methods with LeGrad's contract, for side-by-side comparisons.

Every method takes ``(model, text_embedding, image)`` -- an OpenCLIP model or a
:class:`~legrad.LeWrapper`, ``[P, D]`` (or ``[B, P, D]``) normalised text embeddings and a
``[B, C, H, W]`` preprocessed image batch -- or, for a ViT image classifier (timm, torchvision,
transformers; see :mod:`legrad.classifiers`), ``(model, image=x, target=classes)`` with ``target`` an
int, a sequence of ints or a LongTensor ``[P]`` / ``[B, P]`` checked exactly as
:meth:`~legrad.LeWrapper.compute_legrad` checks it. Each returns ``[B, P, H, W]`` float32 maps in [0, 1]
(patch-grid relevance, bilinearly upsampled, min-max normalised per (image, prompt), exactly as
LeGrad's maps are). They run the image tower through the same stateless tower adapters as LeGrad
(:mod:`legrad.adapters`) and the same pipeline (:mod:`legrad.engine.pipeline`: validation, prologue,
grids, upsampling and normalisation): the model is never modified and calls are thread-safe.

Notation: ``A_l`` is block ``l``'s post-softmax attention ``[heads, N, N]`` (``N`` tokens, the
prefix/CLS token first), ``E_h`` the mean over heads, ``s = <t, normalize(f(x))>`` the cosine
similarity of the model's own image embedding ``f(x)`` with the prompt embedding ``t`` -- for a
classifier ``s = f(x)[c]``, the target class's logit of the model's own eval-mode output -- and the
"CLS row" the row of the token the model pools (row 0 for CLS pooling, the mean of the patch rows
for average pooling, the mean of the class and distillation rows for two-head distilled DeiTs, the
pooler queries for attention-pooled towers and ``map``-pooled classifiers). Prefix columns are
dropped from every map.

* :func:`raw_attention` -- ``E_h A_L[cls, :]`` of the last block; prompt-independent.
* :func:`attention_rollout` -- Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers":
  ``R = prod_l (0.5 E_h A_l + 0.5 I)`` (later blocks on the left), map ``R[cls, :]``;
  prompt-independent.
* :func:`gradcam` -- Selvaraju et al. (2017), "Grad-CAM", on the last block's tokens ``T``
  ``[N, C]`` (the input of its attention, after the block's pre-norm): ``w_c = mean_n ds/dT[n, c]``
  over patch tokens, map ``relu(sum_c w_c T[n, c])``.
* :func:`chefercam` -- Chefer, Gur & Wolf (2021), "Generic Attention-model Explainability for
  Interpreting Bi-Modal and Encoder-Decoder Transformers": ``R = I``, then for each block
  ``R <- R + E_h[relu(ds/dA_l * A_l)] R``; map ``R[cls, :]``.
* :func:`legrad` -- LeGrad itself (:meth:`legrad.LeWrapper.compute_legrad`).

The gradient methods differentiate the model's real image embedding (a classifier's real logits)
through the whole tower (:meth:`~legrad.adapters.base.TowerAdapter.trace`), with
``ds/dA = (ds/dO) V^T`` as in LeGrad. Attention-pooled models (SigLIP towers, timm ``map``
classifiers) pool with a latent query, not a token: raw attention is the pooler's attention, GradCAM
works, rollout and CheferCAM refuse (there is no pooled token's row of the block attentions).

Example::

    from legrad.eval.baselines import METHODS
    maps = {name: fn(model, text_embedding, images) for name, fn in METHODS.items()}
    maps = {name: fn(classifier, image=images, target=[281, 285]) for name, fn in METHODS.items()}
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..adapters.base import LayerStep, TowerAdapter
from ..engine import pipeline
from ..engine.validation import check_layer_index
from ..wrapper import LeWrapper

__all__ = [
    "METHODS",
    "Method",
    "attention_rollout",
    "chefercam",
    "get_method",
    "gradcam",
    "legrad",
    "raw_attention",
]

#: A baseline: ``(model, text_embedding [P, D] or [B, P, D], image [B, C, H, W]) -> [B, P, H, W]``; for
#: classifiers ``(model, image=..., target=...)``.
Method = Callable[..., torch.Tensor]


class _Run:
    """Validated inputs of one call, moved to the tower's device and compute dtype (the pipeline's prologue)."""

    def __init__(self, model: Any, text_embedding: Any, image: Any, target: Any = None):
        wrapper = model if isinstance(model, LeWrapper) else LeWrapper(model, layer_index=-1)
        adapter, model = wrapper.adapter, wrapper.model
        # The engine's own checks: text for CLIP-style towers, class targets for classifiers.
        request = pipeline.Request(image=image, text=text_embedding, target=target, layer_index=-1)
        # The baselines have no empty-prompt correction and bound their own working sets.
        self.call = pipeline.prepare(adapter, model, request, pipeline.Settings(apply_correction=False),
                                     check_budget=False)
        self.adapter: TowerAdapter = adapter
        self.image = self.call.batch.pixels
        self.text = self.call.prompts
        self.dtype = self.call.compute_dtype
        self.grid = self.call.batch.grids[0]
        self.batch = self.call.batch.batch
        self.prompts = self.call.num_prompts

    def scores(self, embedding: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, P]`` of the model's output ``[B, E]``: cosine with the prompts, or the target logits."""
        return self.call.scorer(embedding, self.text)

    def finish(self, rel: torch.Tensor) -> torch.Tensor:
        """``[B, P, N]`` (or ``[B, 1, N]`` for prompt-independent maps) -> ``[B, P, H, W]`` in [0, 1]."""
        # Normalise before casting to float32: min-max amplifies rounding where a map's range is small.
        maps = pipeline.finish(self.call, rel, work_dtype=None)
        if maps.shape[1] != self.prompts:
            maps = maps.expand(-1, self.prompts, -1, -1).contiguous()
        return maps


def _patch_columns(step: LayerStep, rel: torch.Tensor) -> torch.Tensor:
    """Zeroes padded keys and drops the prefix columns: ``[B, ..., Nk]`` -> ``[B, ..., patches]``."""
    if step.key_mask is not None:
        shape = (rel.shape[0],) + (1,) * (rel.ndim - 2) + (rel.shape[-1],)
        rel = rel * step.key_mask.reshape(shape).to(rel.dtype)
    return rel[..., step.num_prefix_tokens:]


def _attention_steps(run: _Run, start: int) -> Iterator[LayerStep]:
    # steps() builds a small per-layer graph for LeGrad; the attention baselines just ignore it.
    return run.adapter.steps(run.image, start, run.dtype)


def _require_self_attention(run: _Run, step: LayerStep, method: str) -> None:
    nq, nk = step.query.shape[-2], step.key.shape[-2]
    if nq != nk:
        raise NotImplementedError(
            f"{method} needs every block's self-attention, but the {run.adapter.family} adapter explains "
            "each layer through its attention pooler; use legrad or raw_attention for this model"
        )


def raw_attention(model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
                  target: Any = None) -> torch.Tensor:
    """Raw attention: the last block's attention from the pooled token, averaged over heads.

    ``map = E_h A_L[cls, patches]``. The prompts only set ``P``: the map is the same for all of them.

    Args:
        model: OpenCLIP model, ViT image classifier or :class:`~legrad.LeWrapper` with a supported tower.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` normalised text embeddings; None for a classifier.
        image: ``[B, C, H, W]`` preprocessed images.
        target: class indices for an image classifier (int, ints, LongTensor ``[P]`` / ``[B, P]``), instead
            of ``text_embedding``.

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1].

    Raises:
        TypeError, ValueError: on invalid inputs, before any computation.
    """
    run = _Run(model, text_embedding, image, target)
    with torch.inference_mode(False), torch.no_grad():
        last = None
        for step in _attention_steps(run, run.adapter.depth - 1):
            last = step
        a = last.probs().mean(1)  # [B, Nq, Nk]
        rel = _patch_columns(last, run.adapter.pooled_row(a, last.num_prefix_tokens))
        return run.finish(rel[:, None])


def attention_rollout(
    model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
    target: Any = None, start_layer: int = 0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020), prompt-independent.

    ``R = (0.5 E_h A_L + 0.5 I) ... (0.5 E_h A_s + 0.5 I)`` over blocks ``s = start_layer .. L``; the
    identity models the residual connection. ``map = R[cls, patches]``.

    Args:
        model: OpenCLIP model, ViT image classifier or :class:`~legrad.LeWrapper`.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` (only ``P`` is used); None for a classifier.
        image: ``[B, C, H, W]`` preprocessed images.
        target: class indices for an image classifier (int, ints, LongTensor ``[P]`` / ``[B, P]``), instead
            of ``text_embedding``.
        start_layer: first block of the product (negative counts from the end); 0 = all blocks.

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1].

    Raises:
        TypeError, ValueError: on invalid inputs, before any computation.
        NotImplementedError: for towers whose adapter explains layers through an attention pooler.
    """
    run = _Run(model, text_embedding, image, target)
    start = check_layer_index(start_layer, run.adapter.depth, "start_layer") % run.adapter.depth
    with torch.inference_mode(False), torch.no_grad():
        rollout, last = None, None
        for step in _attention_steps(run, start):
            _require_self_attention(run, step, "attention rollout")
            a = step.probs().mean(1).to(torch.float64)  # [B, N, N]; float64: a long product of matrices
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            rollout = a if rollout is None else a @ rollout
            last = step
        rel = _patch_columns(last, run.adapter.pooled_row(rollout, last.num_prefix_tokens))
        return run.finish(rel[:, None])


def _traced_gradients(run: _Run, wanted: Callable[[list[LayerStep]], list[torch.Tensor]]):
    """Yields ``(p, steps, grads)`` per prompt: gradients of ``s[:, p]`` w.r.t. ``wanted(steps)``."""
    steps, embedding = run.adapter.trace(run.image, run.dtype)
    targets = wanted(steps)
    with torch.enable_grad():
        # Summing over the batch is exact: each image's score depends only on that image.
        totals = run.scores(embedding).sum(0).unbind()  # P scalars, indexed with grad enabled
    for p in range(run.prompts):
        grads = torch.autograd.grad(totals[p], targets, retain_graph=p < run.prompts - 1)
        yield p, steps, grads


def gradcam(model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
            target: Any = None) -> torch.Tensor:
    """GradCAM (Selvaraju et al., 2017) on the last block's tokens, for each prompt.

    With ``T`` ``[N, C]`` the last block's attention input (after its pre-norm, the usual ViT target
    layer: the last block's *output* patch tokens do not reach a CLS-pooled embedding) and ``s`` the
    prompt's cosine score: ``w_c = mean over patch tokens n of ds/dT[n, c]``,
    ``map[n] = relu(sum_c w_c T[n, c])``.

    Args:
        model: OpenCLIP model, ViT classifier or :class:`~legrad.LeWrapper` whose adapter implements ``trace``.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` normalised text embeddings; None for a classifier.
        image: ``[B, C, H, W]`` preprocessed images.
        target: class indices for an image classifier (int, ints, LongTensor ``[P]`` / ``[B, P]``), instead
            of ``text_embedding``.

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1].

    Raises:
        TypeError, ValueError: on invalid inputs, before any computation.
        NotImplementedError: if the tower adapter has no traced forward.
    """
    run = _Run(model, text_embedding, image, target)
    rel = torch.zeros(run.batch, run.prompts, run.grid[0] * run.grid[1], dtype=run.dtype, device=run.image.device)
    with torch.inference_mode(False), torch.no_grad():
        def last_block_tokens(steps):
            if steps[-1].tokens is None:
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
    return run.finish(rel)


def _gradient_weighted_attention(step: LayerStep, d_out: torch.Tensor) -> torch.Tensor:
    """``E_h[relu(ds/dA * A)]`` ``[B, N, N]`` (float64), built in blocks of query rows.

    ``ds/dA = (ds/dO) V^T`` and ``A`` are both row-wise, so a block of rows needs only
    ``[B, H, block, N]`` at a time instead of several ``[B, H, N, N]`` tensors.
    """
    b, h, n, _ = d_out.shape
    v_t = step.value.to(d_out.dtype).transpose(-1, -2)
    out = torch.empty(b, n, v_t.shape[-1], dtype=torch.float64, device=d_out.device)
    block = max(1, min(n, _CHEFER_BLOCK_ELEMENTS // max(b * h * v_t.shape[-1], 1)))
    for q0 in range(0, n, block):
        rows = slice(q0, min(n, q0 + block))
        grad_attn = d_out[:, :, rows] @ v_t  # [B, H, block, N]
        out[:, rows] = (grad_attn * step.probs(rows).to(d_out.dtype)).clamp_min(0).mean(1).to(torch.float64)
    return out


#: Elements of one ``[B, H, block, N]`` CheferCAM block (16 MiB in float32).
_CHEFER_BLOCK_ELEMENTS = 4 * 2**20


def chefercam(
    model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
    target: Any = None, start_layer: int = 0
) -> torch.Tensor:
    """CheferCAM: gradient-weighted attention rollout (Chefer, Gur & Wolf, 2021), for each prompt.

    ``R = I``; for blocks ``l = start_layer .. L``: ``Abar_l = E_h[relu(ds/dA_l * A_l)]`` and
    ``R <- R + Abar_l R``, where ``ds/dA_l`` is the gradient of the prompt's cosine score through the
    whole tower; ``map = R[cls, patches]``.

    Args:
        model: OpenCLIP model, ViT classifier or :class:`~legrad.LeWrapper` whose adapter implements ``trace``.
        text_embedding: ``[P, D]`` or ``[B, P, D]`` normalised text embeddings; None for a classifier.
        image: ``[B, C, H, W]`` preprocessed images.
        target: class indices for an image classifier (int, ints, LongTensor ``[P]`` / ``[B, P]``), instead
            of ``text_embedding``.
        start_layer: first block used (negative counts from the end); 0 = all blocks.

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1].

    Raises:
        TypeError, ValueError: on invalid inputs, before any computation.
        NotImplementedError: if the tower adapter has no traced forward, or pools with attention (the
            pooled token's row of ``R`` does not exist there).
    """
    run = _Run(model, text_embedding, image, target)
    start = check_layer_index(start_layer, run.adapter.depth, "start_layer") % run.adapter.depth
    if run.adapter.uses_attention_pooler:
        raise NotImplementedError(
            f"CheferCAM reads the pooled token's row of the rollout, which the {run.adapter.family} tower does "
            "not have (it pools with attention); use legrad, gradcam or raw_attention for this model"
        )
    rel = torch.zeros(run.batch, run.prompts, run.grid[0] * run.grid[1], dtype=torch.float64, device=run.image.device)
    with torch.inference_mode(False), torch.no_grad():
        for p, steps, grads in _traced_gradients(run, lambda steps: [s.out for s in steps[start:]]):
            used = steps[start:]
            r = None
            for step, d_out in zip(used, grads):
                _require_self_attention(run, step, "CheferCAM")
                abar = _gradient_weighted_attention(step, d_out)
                if r is None:
                    r = torch.eye(abar.shape[-1], dtype=abar.dtype, device=abar.device).expand(run.batch, -1, -1)
                r = r + abar @ r
            rel[:, p] = _patch_columns(used[-1], run.adapter.pooled_row(r, used[-1].num_prefix_tokens))
    return run.finish(rel)


def legrad(
    model: Any, text_embedding: torch.Tensor | None = None, image: torch.Tensor | None = None, *,
    target: Any = None, layer_index: int | None = None
) -> torch.Tensor:
    """LeGrad (Bousselham et al., 2024) through the same interface as the baselines.

    Args:
        model: OpenCLIP model (wrapped with the default ``layer_index=-2``) or :class:`~legrad.LeWrapper`
            (its ``layer_index`` is used).
        text_embedding: ``[P, D]`` or ``[B, P, D]`` normalised text embeddings; None for a classifier.
        image: ``[B, C, H, W]`` preprocessed images.
        target: class indices for an image classifier (int, ints, LongTensor ``[P]`` / ``[B, P]``), instead
            of ``text_embedding``.
        layer_index: overrides the wrapper's first explained block.

    Returns:
        ``[B, P, H, W]`` float32 maps in [0, 1].
    """
    wrapper = model if isinstance(model, LeWrapper) else LeWrapper(model)
    return wrapper.compute_legrad(text_embedding, image, target=target, layer_index=layer_index)


#: Every method by name, for :mod:`legrad.eval.benchmark` and user loops.
METHODS: dict[str, Method] = {
    "legrad": legrad,
    "raw_attention": raw_attention,
    "rollout": attention_rollout,
    "gradcam": gradcam,
    "chefercam": chefercam,
}


#: Keyword that ``"name@K"`` sets for the methods that have a first block.
_LAYER_KEYWORD = {"legrad": "layer_index", "rollout": "start_layer", "chefercam": "start_layer"}


def get_method(name: str) -> Method:
    """Looks a method up in :data:`METHODS`; ``"name@K"`` fixes its first block to ``K``.

    ``legrad@-2`` is LeGrad with ``layer_index=-2``, ``rollout@3``/``chefercam@3`` start at block 3.

    Args:
        name: a key of :data:`METHODS`, optionally with ``"@K"`` (an int) for the methods with a first block.

    Returns:
        The method, with its first-block keyword bound when ``"@K"`` is given.

    Raises:
        TypeError: if ``name`` is not a str.
        ValueError: naming the known methods when ``name`` is not one of them, or for an invalid ``"@K"``.
    """
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    base, sep, layer = name.partition("@")
    fn = METHODS.get(base)
    if fn is None:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if not sep:
        return fn
    keyword = _LAYER_KEYWORD.get(base)
    try:
        value = int(layer)
    except ValueError:
        value = None
    if keyword is None or value is None:
        options = ", ".join(f"{k}@K" for k in _LAYER_KEYWORD)
        raise ValueError(f"invalid method {name!r}: a first block can be given as {options} (K an integer)")
    return functools.partial(fn, **{keyword: value})
