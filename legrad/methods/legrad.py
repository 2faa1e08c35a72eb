"""LeGrad (Bousselham et al., 2024) as a :class:`~legrad.methods.base.Method`: the very pipeline call of
:meth:`legrad.LeWrapper.compute_legrad` (:func:`legrad.engine.pipeline.run`), no extra work."""

from __future__ import annotations

from typing import Any

import torch

from ..engine import pipeline
from .base import Method
from .targets import Answers, Target

__all__ = ["LeGrad"]


class LeGrad(Method):
    """LeGrad: per explained layer, ``mean over heads and rows of relu(ds/dA)``, summed over layers.

    Options:
        layer_index: first explained block (negative counts from the end); None: the wrapper's (a bare
            model is wrapped with its recommended index, else ``-2``).

    Call options (:meth:`attribute`): ``layer_index`` (overrides the option), ``prompt_chunk``,
    ``output_size`` and extra image inputs, as for :meth:`legrad.LeWrapper.compute_legrad`.
    """

    name = "legrad"
    options = {"layer_index": None}
    first_block = "layer_index"
    explains_answers = True

    def wrap_options(self) -> dict[str, Any]:
        li = self.config["layer_index"]
        return {} if li is None else {"layer_index": li}

    def maps(self, image: Any, target: Target, normalize: bool, *, layer_index: int | None = None,
             prompt_chunk: int | None = None, output_size: str | tuple[int, int] | None = None,
             **inputs: Any) -> torch.Tensor:
        wrapper = self.wrapper
        if layer_index is None:
            layer_index = self.config["layer_index"]
        if layer_index is None:
            layer_index = wrapper.layer_index
        if isinstance(target, Answers):
            if not normalize:
                raise ValueError("normalize=False is not available for a vision-language model's answers")
            return wrapper.compute_legrad(image=image, target=target, layer_index=layer_index,
                                          prompt_chunk=prompt_chunk, output_size=output_size, **inputs)
        request = pipeline.Request(image=image, target=target, layer_index=layer_index, prompt_chunk=prompt_chunk,
                                   output_size=output_size, inputs=inputs, normalize=normalize)
        return pipeline.run(wrapper.adapter, wrapper.model, request, wrapper.settings())
