"""Base of the image-classifier adapters: a class logit is explained instead of a text cosine.

The engine is the one used for CLIP towers; only the per-layer score changes (the ``"logit"`` scorer of
:mod:`legrad.engine.step`). For each explained block ``l`` the classifier adapters compute the layer's
logits: the model's own final norm and classification head (with its ``fc_norm`` or attention-pooling
path where it has one) applied to the **mean of all of block l's tokens**. See :mod:`legrad.classifiers`.

The traced forward of the gradient baselines (:meth:`TowerAdapter.trace`) ends in the model's own logits
(:meth:`readout` is the eval-mode classification output), so GradCAM and CheferCAM differentiate the
target's logit through the real head.
"""

from __future__ import annotations

from typing import Any, ClassVar

from ...engine.targets import Logits
from ...engine.validation import check_image
from ..base import ImageBatch, TowerAdapter

__all__ = ["ClassifierAdapter"]


class ClassifierAdapter(TowerAdapter):
    """Base of the image-classifier adapters: the layer feature is the ``[B, num_classes]`` logits.

    Its readout space is :class:`~legrad.engine.targets.Logits`: it explains class indices (``target=``), not text.
    """

    entry_points: ClassVar[tuple[str, ...]] = ("compute_legrad",)
    uses_empty_prompt_correction: ClassVar[bool] = False

    @classmethod
    def supports_config(cls, model_cfg: dict) -> bool:
        return False  # OpenCLIP configs build CLIP towers, never classifiers (which share the timm towers' code)

    @property
    def embed_dim(self) -> int:
        return self.num_classes

    @property
    def num_classes(self) -> int:
        """The classifier's class count."""
        raise NotImplementedError

    @property
    def readout_space(self) -> Logits:
        return Logits(self.num_classes)

    def own_output(self, model, image):
        out = model(image)
        return getattr(out, "logits", out)  # transformers return an output object

    def prepare_inputs(self, image: Any, **inputs: Any) -> ImageBatch:
        if inputs:
            raise TypeError(f"compute_legrad got unexpected keyword arguments {sorted(inputs)} for {self.family}")
        return self.image_batch(check_image(image, self))

