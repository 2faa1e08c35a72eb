"""The tower-adapter protocol: how to run a model family's image tower so that LeGrad can explain it.

An adapter validates a call's image inputs (:meth:`TowerAdapter.prepare_inputs`) and turns them into
a sequence of :class:`~legrad.engine.step.LayerStep` objects, one per explained layer
(:meth:`TowerAdapter.steps`). A step holds the per-head attention output ``O`` of the attention that
LeGrad differentiates (a leaf tensor that requires grad), the values ``V`` of that attention, and the
tower's embedding for that layer computed from ``O`` (the autograd graph between the two is the only
graph built). The engine (:mod:`legrad.engine`) needs nothing else, so a new model family is one new
class registered with :func:`legrad.adapters.registry.register_tower`; most families declare their tower
for the block runner instead (:class:`~legrad.adapters.runner.BlockTower`), which gives ``steps``.

An adapter describes a tower; what legrad does with that description (the drift guard's re-run,
``return_scores``' model output, the baselines' pooled rows) lives with the code that does it.

All towers are run statelessly from their modules' weights: no hooks, no ``forward`` rebinding, no
writes, eval semantics whatever the module mode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.step import ImageBatch, LayerStep, ModelInput
from ..engine.targets import Embedding, ReadoutSpace
from ..engine.validation import check_image
from .capabilities import Capabilities, MissingCapability, TracedStep, missing

__all__ = ["TowerAdapter", "LayerStep", "TracedStep", "ImageBatch", "UNSUPPORTED_HINT", "MissingCapability"]

UNSUPPORTED_HINT = (
    "LeGrad needs a Vision Transformer image tower with self-attention blocks; ModifiedResNet (RN50...), "
    "ConvNeXt, FastViT/MobileCLIP-S and Swin towers are not supported."
)


class TowerAdapter(Capabilities):
    """Base class and core protocol of the per-family adapters: what the engine and the wrapper need.
    The optional part (how the tower pools, its readout, the traced forward, the drift guard's reference,
    reference mode) is in :class:`~legrad.adapters.capabilities.Capabilities`; a missing member raises
    :class:`MissingCapability`.

    Subclasses implement :meth:`matches` (or :meth:`from_model`), :attr:`depth`, :attr:`patch_size`,
    :attr:`embed_dim` and :meth:`steps`; the rest has defaults for a ``[B, C, H, W]`` ViT whose readout is
    an image embedding (:attr:`readout_space`). :attr:`family` names the family in messages and tables.
    """

    family: ClassVar[str] = "abstract"
    #: Entry points of :class:`~legrad.LeWrapper` that are valid for this family.
    entry_points: ClassVar[tuple[str, ...]] = ("compute_legrad",)
    #: Whether LeWrapper applies the empty-prompt correction (SigLIP-style attention-pooled towers).
    uses_empty_prompt_correction: ClassVar[bool] = False
    #: How to provide the correction's empty prompt (shown when it is missing or has the wrong width): the
    #: offline ways first, the one that may download last and said so.
    correction_hint: ClassVar[str] = (
        "pass the tokenizer you encode your prompts with, LeWrapper(model, tokenizer=tokenizer) (a model saved "
        "on disk: tokenizer=open_clip.get_tokenizer('local-dir:/path/to/model')), or the prompt's embedding, "
        "LeWrapper(model, empty_text_embedding=model.encode_text(tokenizer(['a photo of a']), normalize=True)[0]), "
        "or turn the correction off with apply_correction=False; open_clip.get_tokenizer(model_name) also works "
        "but downloads a SigLIP model's tokenizer from the Hugging Face Hub when it is not cached"
    )
    #: Whether images of one batch may have different grids (maps then come back as a list).
    variable_grids: ClassVar[bool] = False
    #: Whether maps are min-max normalised on the patch grid before upsampling (only legrad-torch 1.1's
    #: SigLIP maps, see :meth:`for_reference`); legrad upsamples, then normalises.
    normalizes_on_grid: ClassVar[bool] = False

    def __init__(self, visual: nn.Module):
        self.visual = visual

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        """Whether this adapter handles the image tower ``visual`` (``model.visual``): what the default
        :meth:`from_model` asks. A family found another way overrides :meth:`from_model` instead."""
        raise MissingCapability(f"the {cls.family} adapter defines neither matches nor from_model")

    @classmethod
    def from_model(cls, model: nn.Module) -> TowerAdapter | None:
        """The adapter for ``model``'s image tower, or None if this family does not apply.

        The default looks at ``model.visual`` (OpenCLIP); other model libraries override this.
        """
        visual = getattr(model, "visual", None)
        if visual is not None and cls.matches(visual):
            return cls(visual)
        return None

    @property
    def depth(self) -> int:
        """Number of transformer blocks."""
        raise missing(self, "depth", "the pipeline")

    @property
    def patch_size(self) -> tuple[int, int]:
        """``(ph, pw)`` pixels per patch."""
        raise missing(self, "patch_size", "the pipeline")

    @property
    def readout_space(self) -> ReadoutSpace:
        """What the tower's readout is (a type of :mod:`legrad.engine.targets`): by default an image
        embedding of width :attr:`embed_dim` compared with text (classifiers: :class:`Logits`; VLMs:
        :class:`AnswerScores`). The targets check themselves against it."""
        return Embedding(self.embed_dim)

    @property
    def in_chans(self) -> int:
        """Image channels the tower takes."""
        return 3

    @property
    def embed_dim(self) -> int:
        """Width of the tower's output embedding (must equal the text embedding width)."""
        raise missing(self, "embed_dim", "the pipeline")

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

    def steps(self, image: ModelInput, start: int, compute_dtype: torch.dtype) -> Iterator[LayerStep]:
        """Runs the tower once and yields one :class:`LayerStep` per block from ``start`` to the last.

        Must be called under ``torch.no_grad()``; each step's graph is built under ``enable_grad``.

        Args:
            image: ``ImageBatch.pixels`` of :meth:`prepare_inputs`, on the tower's device and dtype.
            start: first explained block (0-based, non-negative).
            compute_dtype: dtype of the explained layers' graph (float32 for half-precision models).
        """
        raise missing(self, "steps", "the pipeline")
