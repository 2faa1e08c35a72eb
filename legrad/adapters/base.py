"""The tower-adapter protocol: how to run a model family's image tower so that LeGrad can explain it.

An adapter validates a call's image inputs (:meth:`TowerAdapter.prepare_inputs`) and turns them into
a sequence of :class:`~legrad.engine.step.LayerStep` objects, one per explained layer
(:meth:`TowerAdapter.steps`). A step holds the per-head attention output ``O`` of the attention that
LeGrad differentiates (a leaf tensor that requires grad), the values ``V`` of that attention, and the
tower's embedding for that layer computed from ``O`` (the autograd graph between the two is the only
graph built). The engine (:mod:`legrad.engine`) needs nothing else, so a new model family is one new
class registered with :func:`legrad.adapters.registry.register_tower`.

All towers are run statelessly from their modules' weights: no hooks, no ``forward`` rebinding, no
writes, eval semantics whatever the module mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.step import ImageBatch, LayerStep, ModelInput
from ..engine.validation import check_image

__all__ = ["TowerAdapter", "LayerStep", "ImageBatch", "UNSUPPORTED_HINT"]

UNSUPPORTED_HINT = (
    "LeGrad needs a Vision Transformer image tower with self-attention blocks; ModifiedResNet (RN50...), "
    "ConvNeXt, FastViT/MobileCLIP-S and Swin towers are not supported."
)


class TowerAdapter:
    """Base class and protocol of the per-family adapters: everything the engine, the wrapper and the
    baselines may ask of a family is declared here.

    Subclasses implement :meth:`matches` (or :meth:`from_model`), :attr:`depth`, :attr:`patch_size`,
    :attr:`embed_dim` and :meth:`steps`; the rest has defaults for a ``[B, C, H, W]`` ViT scored by
    cosine with text embeddings. :attr:`family` names the family in messages and tables.
    """

    family: ClassVar[str] = "abstract"
    #: Entry points of :class:`~legrad.LeWrapper` that are valid for this family.
    entry_points: ClassVar[tuple[str, ...]] = ("compute_legrad",)
    #: Whether LeWrapper applies the empty-prompt correction (SigLIP-style attention-pooled towers).
    uses_empty_prompt_correction: ClassVar[bool] = False
    #: How to provide the correction's empty prompt (shown when it is missing or has the wrong width).
    correction_hint: ClassVar[str] = (
        "pass LeWrapper(model, tokenizer=open_clip.get_tokenizer(model_name)) or "
        "LeWrapper(model, empty_text_embedding=model.encode_text(tokenizer(['a photo of a']), normalize=True)[0]), "
        "or turn the correction off with apply_correction=False"
    )
    #: What a layer's feature is scored against: ``"cosine"`` (text embeddings) or ``"logit"`` (class
    #: indices of an image classifier, ``target=``); see :func:`legrad.engine.step.scorer_for`.
    scorer: ClassVar[str] = "cosine"
    #: Whether images of one batch may have different grids (maps then come back as a list).
    variable_grids: ClassVar[bool] = False
    #: Whether maps are min-max normalised on the patch grid before upsampling (only legrad-torch 1.1's
    #: SigLIP maps, see :meth:`for_reference`); legrad upsamples, then normalises.
    normalizes_on_grid: ClassVar[bool] = False

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        """Whether this adapter handles the image tower ``visual``."""
        raise NotImplementedError

    @classmethod
    def from_model(cls, model: nn.Module) -> TowerAdapter | None:
        """The adapter for ``model``'s image tower, or None if this family does not apply.

        The default looks at ``model.visual`` (OpenCLIP); other model libraries override this.
        """
        visual = getattr(model, "visual", None)
        if visual is not None and cls.matches(visual):
            return cls(visual)
        return None

    @classmethod
    def supports_config(cls, model_cfg: dict) -> bool:
        """Whether an OpenCLIP model config (``open_clip.get_model_config``) builds a tower of this family."""
        return False

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        raise NotImplementedError

    @property
    def patch_size(self) -> tuple[int, int]:
        """``(ph, pw)`` pixels per patch."""
        raise NotImplementedError

    @property
    def in_chans(self) -> int:
        """Image channels the tower takes."""
        return 3

    @property
    def embed_dim(self) -> int:
        """Width of the tower's output embedding (must equal the text embedding width)."""
        raise NotImplementedError

    @property
    def uses_attention_pooler(self) -> bool:
        """Whether the embedding comes from an attention pooler (its queries are the explained rows)."""
        return False

    @property
    def pools_by_average(self) -> bool:
        """Whether the embedding is the average of the patch tokens (else: the first token's row)."""
        return False

    @property
    def num_classes(self) -> int:
        """Classes of an image classifier (``scorer == "logit"``)."""
        raise TypeError(f"the {self.family} tower is not an image classifier")

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (class token, registers); used for memory estimates."""
        return 1

    @property
    def width(self) -> int:
        """Token width of the tower (the widest normalised width: an upper value for memory estimates)."""
        widths = [int(m.normalized_shape[-1]) for m in self.visual.modules()
                  if isinstance(getattr(m, "normalized_shape", None), (tuple, list, torch.Size))
                  and len(m.normalized_shape)]
        return max(widths) if widths else self.embed_dim

    def param_dtype(self) -> torch.dtype:
        """dtype of the tower's (first floating) parameters."""
        for p in self.visual.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def device(self) -> torch.device:
        """Device of the tower's parameters."""
        for p in self.visual.parameters():
            return p.device
        return torch.device("cpu")

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid for an input size.

        Raises:
            ValueError: if the size is not a multiple of the patch size.
        """
        ph, pw = self.patch_size
        if height < ph or width < pw:
            raise ValueError(
                f"image size {height}x{width} is smaller than one patch ({ph}x{pw}); resize it to at least "
                f"{ph}x{pw} (e.g. LePreprocess(preprocess, image_size={max(ph, pw)}))"
            )
        if height % ph or width % pw:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {ph}x{pw}; resize it "
                f"(e.g. LePreprocess(preprocess, image_size={max(ph, (height // ph) * ph)})) or crop to "
                f"{(height // ph) * ph}x{(width // pw) * pw}"
            )
        return height // ph, width // pw

    def prepare_inputs(self, image: Any, **inputs: Any) -> ImageBatch:
        """Validates a call's image inputs (before any work) and describes the batch.

        The default takes a ``[B, C, H, W]`` float tensor and no extra inputs; families with other
        input formats (processor outputs, NaFlex masks) override it.

        Raises:
            TypeError, ValueError: naming the bad input and the fix.
        """
        if inputs:
            raise TypeError(f"compute_legrad got unexpected keyword arguments {sorted(inputs)}")
        return self.image_batch(check_image(image, self))

    def image_batch(self, image: torch.Tensor) -> ImageBatch:
        """The :class:`ImageBatch` of a validated ``[B, C, H, W]`` tensor (one grid for all images)."""
        height, width = image.shape[-2:]
        gh, gw = self.grid_size(height, width)
        b = image.shape[0]
        return ImageBatch(image, [(gh, gw)] * b, [(height, width)] * b, gh * gw + self.num_prefix_tokens)

    def encode_prompts(self, model: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        """Normalised ``[P, D]`` embeddings of ``prompts`` by the model's text tower (for the correction).

        The default is open_clip's ``encode_text(tokenizer(prompts), normalize=True)``.
        """
        tokens = tokenizer(list(prompts))
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return model.encode_text(tokens.to(device), normalize=True)

    def pooled_row(self, mat: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """The pooled token's row of a token-to-token matrix ``[B, Nq, Nk]`` -> ``[B, Nk]`` (baselines).

        Attention poolers (``Nq != Nk``): the mean of their query rows; average pooling (or no prefix
        token): the mean of the patch rows; otherwise the first (class) token's row.
        """
        nq, nk = mat.shape[-2:]
        if nq != nk:
            return mat.mean(1)
        if self.pools_by_average or num_prefix_tokens == 0:
            return mat[:, num_prefix_tokens:].mean(1)
        return mat[:, 0]

    def for_reference(self, reference: str) -> TowerAdapter | None:
        """An adapter computing the original package's maps (``LeWrapper(reference=...)``) for this tower.

        Args:
            reference: a release of legrad-torch (``"1.1"``).

        Returns:
            The adapter (``self`` where the two agree), or None if the original never supported the family.

        Raises:
            ValueError: if the family was supported but this tower has something the original never handled.
        """
        return None

    def steps(self, image: ModelInput, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        """Runs the tower once and yields one :class:`LayerStep` per block from ``start`` to the last.

        Must be called under ``torch.no_grad()``; each step's graph is built under ``enable_grad``.

        Args:
            image: ``ImageBatch.pixels`` of :meth:`prepare_inputs`, on the tower's device and dtype.
            start: first explained block (0-based, non-negative).
            compute_dtype: dtype of the explained layers' graph (float32 for half-precision models).
        """
        raise NotImplementedError

    def final_embedding(self, step: LayerStep) -> torch.Tensor:
        """The model's own image embedding ``[B, E]`` (what ``encode_image`` returns, un-normalised; the
        logits ``[B, K]`` for classifiers) from the step of the tower's last block (no second pass).

        Attention-pooled towers: the last step's feature (the pooler on the final tokens). Others: the
        tower's own pooling and head (:meth:`pooled_output`) on ``step.block_output``.

        Raises:
            NotImplementedError: if the family's steps carry no ``block_output``.
        """
        if self.uses_attention_pooler:
            return step.feature.detach()
        if step.block_output is None:
            raise NotImplementedError(
                f"the {self.family} adapter's steps carry no block_output, which return_scores needs"
            )
        return self.pooled_output(step.block_output)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        """An image classifier's eval-mode logits ``[B, K]``, recomputed statelessly (no grad)."""
        raise TypeError(f"class_logits needs an image classifier; this model's tower is {self.family}")

    # ------------------------------------------------------------------ drift guard (legrad.adapters.drift)
    @property
    def native_size(self) -> tuple[int, int]:
        """``(H, W)`` the model's own forward accepts: the tower's ``image_size``, its config's, or its
        patch embedding's ``img_size``."""
        v = self.visual
        size = getattr(v, "image_size", None)
        if size is None:
            size = getattr(getattr(v, "config", None), "image_size", None)
        if size is None:
            size = getattr(getattr(v, "patch_embed", None), "img_size", None)
        if size is None:
            raise TypeError(f"the {self.family} adapter does not know its tower's native size (native_size)")
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def probe_input(self) -> ModelInput:
        """The drift guard's input: fixed-seed normal noise ``[1, C, H, W]`` at :attr:`native_size`, on the
        tower's device and in its dtype (a private generator: the global RNG is not advanced)."""
        h, w = self.native_size
        noise = torch.randn(1, self.in_chans, h, w, generator=torch.Generator().manual_seed(0))
        return noise.to(self.device(), self.param_dtype())

    def own_output(self, model: nn.Module, image: ModelInput) -> torch.Tensor:
        """The model's own output for ``image`` that :meth:`rerun_output` recomputes (open_clip's
        ``encode_image``, a classifier's logits, Hugging Face image features), un-normalised.

        Args:
            model: an eval-mode view of the wrapped model (never the model itself).
            image: :meth:`probe_input`.

        Raises:
            TypeError: if the family does not declare it (its re-run then cannot be checked).
        """
        raise TypeError(f"the {self.family} adapter has no own_output: its re-run cannot be checked")

    def rerun_output(self, image: ModelInput) -> torch.Tensor:
        """legrad's stateless re-run of what :meth:`own_output` returns, in the tower's dtype (no grad).

        The default runs the traced forward's blocks (:meth:`trace_tokens`, :meth:`trace_block`,
        :meth:`pooled_output`) without building a graph.
        """
        x, context = self.trace_tokens(image, self.param_dtype())
        for i in range(self.depth):
            x, _ = self.trace_block(i, x, context)
        return self.pooled_output(x)

    # ------------------------------------------------------------------ traced forward (gradient baselines)
    def trace(self, image: ModelInput, compute_dtype: torch.dtype) -> tuple[list[LayerStep], torch.Tensor]:
        """Runs the whole tower as ONE differentiable graph (for gradient baselines: GradCAM, CheferCAM).

        Unlike :meth:`steps`, later blocks depend on earlier ones in the graph, and the embedding is the
        model's own pooled output (what ``encode_image`` returns, un-normalised). Call it under
        ``torch.no_grad()``; the graph is built under ``enable_grad``. Families provide
        :meth:`trace_tokens`, :meth:`trace_block` and :meth:`pooled_output`.

        Args:
            image: as for :meth:`steps`.
            compute_dtype: dtype of the graph.

        Returns:
            ``(steps, embedding)``: one :class:`LayerStep` per block (``out`` and ``tokens`` are non-leaf
            tensors of the graph, ``feature`` is the embedding) and the ``[B, E]`` embedding.

        Raises:
            NotImplementedError: if the family has no traced forward.
        """
        # The embedded tokens are the graph's only leaf: every later activation is a function of them.
        x, context = self.trace_tokens(image, compute_dtype)
        x = x.detach().requires_grad_(True)
        steps = []
        with torch.enable_grad():
            for i in range(self.depth):
                x, step = self.trace_block(i, x, context)
                steps.append(step)
            embedding = self.pooled_output(x)
        for step in steps:
            step.feature = embedding
        return steps, embedding

    def trace_tokens(self, image: ModelInput, compute_dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
        """Tokens ``[B, N, C]`` entering the first block, in ``compute_dtype`` (the traced graph's leaf),
        and a context handed to every :meth:`trace_block` (per-call tables such as rotary embeddings)."""
        raise NotImplementedError(
            f"the {self.family} adapter has no traced forward (TowerAdapter.trace), which gradient "
            "baselines (GradCAM, CheferCAM) need; LeGrad and raw attention still work"
        )

    def trace_block(self, layer: int, x: torch.Tensor, context: Any) -> tuple[torch.Tensor, LayerStep]:
        """Block ``layer`` in the traced graph: its output and its step (``out``, ``tokens`` in the graph)."""
        raise NotImplementedError

    def pooled_output(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's own embedding ``[B, E]`` from the last block's tokens (what ``encode_image`` returns)."""
        raise NotImplementedError
