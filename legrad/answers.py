"""The model's own answer, explained: :func:`explain_answer` runs a VLM's greedy ``generate`` and explains every
token it produced (``LeWrapper.explain_answer`` is its entry point; docs/vlm.md, "The model's own answer").

Built on the public API only: the answer's token ids go to ``compute_legrad(answers=[ids], per_token=True,
return_scores=True)`` (one map and the model's own log-probability per token) and to ``compute_legrad(answers=[ids],
return_scores=True)`` (the whole answer's map and summed log-probability). A batch is explained row by row, since
each row has its own answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .adapters.vlm.inputs import VIDEO_KEYS
from .engine.deadline import check_deadline
from .engine.targets import AnswerScores
from .engine.validation import check_layer_index, check_output_size, check_prompt_chunk

__all__ = ["AnswerExplanation", "MAX_NEW_TOKENS", "explain_answer"]

#: The most tokens one call generates (and explains: one map each).
MAX_NEW_TOKENS = 512

# generate() options that keep the decoding greedy and deterministic: the maps explain the answer a reader can
# reproduce. Sampling, beam search and assisted decoding are refused (see docs/vlm.md).
_ALLOWED = frozenset({"eos_token_id", "pad_token_id", "min_new_tokens", "repetition_penalty", "no_repeat_ngram_size",
                      "bad_words_ids", "suppress_tokens", "do_sample", "num_beams", "use_cache"})
_SAMPLING = frozenset({"temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
                       "num_return_sequences", "num_beam_groups", "diversity_penalty", "penalty_alpha",
                       "generation_config", "assistant_model", "prompt_lookup_num_tokens", "streamer"})


@dataclass
class AnswerExplanation:
    """A VLM's greedy answer to each prompt of a batch, and its LeGrad maps.

    Each field is a tensor over the batch when every row agrees in length (and in map size), else a list with
    one entry per row, as ``compute_legrad`` returns maps of differently sized images.

    Attributes:
        token_ids: ``[B, T]`` LongTensor (or B 1-D tensors): exactly the new tokens of ``generate``, the
            end-of-sequence token included when the model emitted it, the padding after it dropped.
        tokens: B lists of T strings, each token decoded on its own (special tokens kept, e.g. ``"</s>"``).
        text: B strings, the decoded answers without special tokens.
        maps: ``[B, T, H, W]`` float32 in [0, 1] (or B ``[T_b, H_b, W_b]``): map ``t`` explains the
            log-probability of token ``t`` given the prompt and tokens ``0..t-1``.
        logprobs: ``[B, T]`` float32 (or B ``[T_b]``): the model's own log-softmax at each token.
        answer_map: ``[B, H, W]`` float32 in [0, 1] (or B ``[H_b, W_b]``): the map of the whole answer's summed
            log-probability.
        answer_logprob: ``[B]`` float32, that sum.
    """

    token_ids: torch.Tensor | list[torch.Tensor]
    tokens: list[list[str]]
    text: list[str]
    maps: torch.Tensor | list[torch.Tensor]
    logprobs: torch.Tensor | list[torch.Tensor]
    answer_map: torch.Tensor | list[torch.Tensor]
    answer_logprob: torch.Tensor

    def __len__(self) -> int:
        return len(self.tokens)

    def row(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row ``b``'s ``(token_ids [T], maps [T, H, W], logprobs [T], answer_map [H, W])``."""
        return self.token_ids[b], self.maps[b], self.logprobs[b], self.answer_map[b]


def _check_generate_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    for key, value in kwargs.items():
        if key in _SAMPLING or (key == "do_sample" and value is not False) or (key == "num_beams" and value != 1):
            raise ValueError(f"explain_answer explains the model's greedy answer, so that the maps explain an answer "
                             f"you can reproduce; {key}={value!r} is not greedy decoding (remove it, or explain "
                             "a sampled answer with compute_legrad(image=inputs, answers=[ids], per_token=True))")
        if key not in _ALLOWED:
            raise TypeError(f"explain_answer got an unexpected generate option {key!r}; accepted: {sorted(_ALLOWED)}")
    return {**kwargs, "do_sample": False, "num_beams": 1}


def _check_inputs(inputs: Any) -> tuple[dict[str, Any], int, int]:
    """``(inputs as a dict, batch size, prompt length)``; the adapter checks the rest when it explains."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"explain_answer needs the processor output (a mapping with pixel_values and input_ids), "
                        f"got {type(inputs).__name__}")
    inputs = dict(inputs)
    video = [k for k in VIDEO_KEYS if inputs.get(k) is not None]
    if video:  # refused before generating (compute_legrad refuses them too)
        raise ValueError(f"video inputs ({', '.join(video)}) are not supported: legrad explains one image per "
                         "sequence; call the processor with images= only")
    ids, pixels = inputs.get("input_ids"), inputs.get("pixel_values")
    if not isinstance(ids, torch.Tensor) or not isinstance(pixels, torch.Tensor):
        raise ValueError("the processor output needs input_ids and pixel_values tensors: call the processor with "
                         "images=, text= and return_tensors='pt'")
    if ids.ndim != 2 or ids.is_floating_point() or ids.dtype == torch.bool or 0 in ids.shape:
        raise ValueError(f"input_ids must be a non-empty [B, L] integer tensor, got {ids.dtype} {tuple(ids.shape)}")
    batch = ids.shape[0]
    if batch > 1:  # explained row by row: every tensor must have one entry per row
        odd = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and (v.ndim == 0 or v.shape[0] != batch)]
        if odd:
            raise ValueError(f"explain_answer explains a batch row by row; {odd} have no per-row first dimension of "
                             f"size {batch}: pass one prompt at a time")
    return inputs, batch, ids.shape[1]


def _eos_ids(model: Any, kwargs: dict[str, Any]) -> set[int]:
    eos = kwargs.get("eos_token_id", getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if eos is None:
        return set()
    if isinstance(eos, torch.Tensor):
        return {int(v) for v in eos.flatten()}
    return {int(eos)} if isinstance(eos, int) else {int(v) for v in eos}


def _new_tokens(row: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """One row of generate's new tokens, up to and including its first end-of-sequence token (the rest of a
    finished row is generate's padding)."""
    for t, tok in enumerate(row.tolist()):
        if tok in eos:
            return row[: t + 1]
    return row


class _Deadline:
    """A stopping criterion that never stops: it raises past the caller's time limit, between two tokens."""

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        check_deadline()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _stack_or_list(items: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    if all(x.shape == items[0].shape for x in items):
        return torch.stack(items)
    return items


def explain_answer(wrapper: Any, inputs: Any, max_new_tokens: int = 32, *, layer_index: int | None = None,
                   output_size: Any = None, prompt_chunk: int | None = None,
                   **generate_kwargs: Any) -> AnswerExplanation:
    """Generates the model's greedy answer to each prompt, then explains it token by token.

    Args:
        wrapper: a ``LeWrapper`` of a supported VLM, with its processor as ``tokenizer``.
        inputs: the processor output (``pixel_values``, ``input_ids``, ``attention_mask``...), ``[B, ...]``.
        max_new_tokens: the most tokens generated per row, 1 to :data:`MAX_NEW_TOKENS`.
        layer_index, output_size, prompt_chunk: as for ``compute_legrad``.
        **generate_kwargs: greedy-compatible ``generate`` options (``eos_token_id``, ``pad_token_id``,
            ``min_new_tokens``, ``repetition_penalty``, ``no_repeat_ngram_size``, ``bad_words_ids``,
            ``suppress_tokens``, ``use_cache``; ``do_sample=False``, ``num_beams=1``).

    Returns:
        The :class:`AnswerExplanation`.

    Raises:
        TypeError, ValueError: for a model that is not a VLM, no tokenizer, a model in training mode, bad
            inputs, ``max_new_tokens`` out of range or sampling options (before any work); ValueError if the
            model generated its own image placeholder token (it cannot be teacher-forced).
        legrad.engine.deadline.RequestTimeoutError: past the caller's deadline (checked between tokens).
    """
    if not isinstance(wrapper.adapter.readout_space, AnswerScores):
        raise TypeError(f"explain_answer applies to vision-language models (LLaVA, PaliGemma); this model's tower "
                        f"({wrapper.tower_family}) is explained with compute_legrad")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (one map per token), got "
                         f"{max_new_tokens}")
    gen = _check_generate_kwargs(generate_kwargs)
    check_output_size(output_size)
    check_prompt_chunk(prompt_chunk)
    layer = wrapper.layer_index if layer_index is None else layer_index
    check_layer_index(layer, wrapper.adapter.depth)
    tok = getattr(wrapper.tokenizer, "tokenizer", wrapper.tokenizer)
    if tok is None or not callable(getattr(tok, "decode", None)):
        raise ValueError("explain_answer decodes the answer with the wrapper's tokenizer: LeWrapper(model, "
                         "tokenizer=processor)")
    model = wrapper.model
    if any(m.training for m in model.modules()):
        raise ValueError("the VLM is in training mode (dropout would make the answer and the maps random); call "
                         "model.eval()")
    inputs, batch, length = _check_inputs(inputs)

    check_deadline()
    device = next(model.parameters()).device
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**on_device, max_new_tokens=max_new_tokens, stopping_criteria=[_Deadline()], **gen)
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    eos = _eos_ids(model, gen)
    ids = [_new_tokens(sequences[b, length:].detach().cpu(), eos) for b in range(batch)]
    image_token = getattr(model.config, "image_token_id", None)
    for b, row in enumerate(ids):
        if image_token is not None and bool((row == image_token).any()):
            raise ValueError(f"the model generated its image placeholder token ({image_token}) in answer {b}; such an "
                             "answer cannot be explained (pass suppress_tokens=[image token id])")

    options = dict(layer_index=layer_index, output_size=output_size, prompt_chunk=prompt_chunk, return_scores=True)
    maps, logprobs, answer_maps, sums = [], [], [], []
    for b in range(batch):
        row = {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()} if batch > 1 else inputs
        m, lp = wrapper.compute_legrad(image=row, answers=[ids[b]], per_token=True, **options)
        am, total = wrapper.compute_legrad(image=row, answers=[ids[b]], **options)
        maps.append(m[0])
        logprobs.append(lp[0])
        answer_maps.append(am[0][0])
        sums.append(total[0, 0])
    tokens = [[tok.decode([i], skip_special_tokens=False) for i in row.tolist()] for row in ids]
    text = [tok.decode(row.tolist(), skip_special_tokens=True) for row in ids]
    return AnswerExplanation(token_ids=_stack_or_list(ids), tokens=tokens, text=text, maps=_stack_or_list(maps),
                             logprobs=_stack_or_list(logprobs), answer_map=_stack_or_list(answer_maps),
                             answer_logprob=torch.stack(sums))
