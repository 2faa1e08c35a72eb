"""Inputs of a VLM explanation: the processor output, the candidate answers, and the packed sequences
the language model scores (prompt tokens of one row, the answer right after them, right padding).

Pure tensor bookkeeping: nothing here runs a model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...ops.functional import linear

__all__ = ["VIDEO_KEYS", "VLMInputs", "Packed", "read_inputs", "tokenize_answers", "pack", "answer_logprobs"]

logger = logging.getLogger(__name__)

# Keys of a processor output this module reads. Any other key (PaliGemma's ``labels``, a chat template's
# extras) does not enter the score: it is ignored with a debug log, so the processor's whole output is
# accepted as it comes.
_KNOWN = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "image_sizes")
#: Keys of a processor's video output: refused (legrad explains one image per sequence, no video).
VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")


@dataclass
class VLMInputs:
    """A validated call.

    Attributes:
        pixel_values: ``[B, C, H, W]`` (``[B, tiles, C, H, W]`` for any-resolution families).
        prompts: B 1-D LongTensors, each row's real prompt tokens (padding removed), image tokens included.
        token_types: B 1-D LongTensors (``token_type_ids`` of the real tokens) or None.
        image_sizes: ``[B, 2]`` original image sizes or None.
        extra: the family's own further inputs (``extra_keys`` of :func:`read_inputs`), as given.
    """

    pixel_values: torch.Tensor
    prompts: list[torch.Tensor]
    token_types: list[torch.Tensor] | None
    image_sizes: torch.Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return len(self.prompts)


def _tensor(value: Any, name: str, ndim: int, integer: bool) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__} (call the processor with "
                        "return_tensors='pt')")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if integer and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value


def read_inputs(image: Any, inputs: dict[str, Any], image_token_id: int, vocab_size: int,
                pixel_ndim: int = 4, extra_keys: Sequence[str] = ()) -> VLMInputs:
    """Validates the processor output (``image=``, a mapping, merged with keyword ``inputs``).

    Args:
        image: the processor output (a mapping with ``pixel_values``, ``input_ids``...).
        inputs: the same keys as keyword arguments (they override the mapping's).
        image_token_id: the model's image placeholder token.
        vocab_size: the language model's vocabulary size (the image token may lie outside it).
        pixel_ndim: dimensions of ``pixel_values`` (4; 5 for tiled families; 2 for flattened patches).
        extra_keys: further keys the family reads (kept in :attr:`VLMInputs.extra`, e.g. Qwen's
            ``image_grid_thw``).

    Returns:
        The :class:`VLMInputs`.

    Raises:
        TypeError, ValueError: naming the bad input and the fix.
    """
    if image is None:
        raise ValueError("image is required: pass the processor output, e.g. compute_legrad(image=processor("
                         "images=img, text=prompt, return_tensors='pt'), answers=[...])")
    if not isinstance(image, Mapping):
        raise TypeError(f"a VLM needs the processor output (a mapping with pixel_values and input_ids) as image=, "
                        f"got {type(image).__name__}")
    merged = {**dict(image), **inputs}
    video = [k for k in VIDEO_KEYS if merged.get(k) is not None]
    if video:
        raise ValueError(f"video inputs ({', '.join(video)}) are not supported: legrad explains one image per "
                         "sequence; call the processor with images= only")
    unused = sorted(str(k) for k in merged if k not in _KNOWN and k not in extra_keys)
    if unused:
        logger.debug("inputs %s do not enter the answers' scores; ignored", unused)
    for key in ("pixel_values", "input_ids"):
        if merged.get(key) is None:
            raise ValueError(f"the processor output has no {key!r}; call the processor with both images= and text=")
    pixels = _tensor(merged["pixel_values"], "pixel_values", pixel_ndim, integer=False)
    if not pixels.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor, got {pixels.dtype}")
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError("pixel_values contains NaN or infinite values")
    ids = _tensor(merged["input_ids"], "input_ids", 2, integer=True).detach().cpu().long()
    b, length = ids.shape
    if b == 0 or length == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)})")
    if pixel_ndim != 2 and pixels.shape[0] != b:  # flattened patches (Qwen) are counted by the family
        raise ValueError(f"pixel_values holds {pixels.shape[0]} image(s) for {b} prompt(s); this VLM takes one image "
                         "per prompt")
    mask = merged.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    mask = _tensor(mask, "attention_mask", 2, integer=False).detach().cpu()
    if tuple(mask.shape) != (b, length):
        raise ValueError(f"attention_mask must have input_ids' shape {(b, length)}, got {tuple(mask.shape)}")
    mask = mask.bool()
    types = merged.get("token_type_ids")
    if types is not None:
        types = _tensor(types, "token_type_ids", 2, integer=True).detach().cpu().long()
        if tuple(types.shape) != (b, length):
            raise ValueError(f"token_type_ids must have input_ids' shape {(b, length)}, got {tuple(types.shape)}")
    prompts, kept_types = [], []
    for row in range(b):
        real = mask[row].nonzero().flatten()
        if real.numel() == 0:
            raise ValueError(f"row {row} of attention_mask has no token")
        if int(real[-1] - real[0]) + 1 != real.numel():
            raise ValueError(f"row {row} of attention_mask has holes; only left or right padding is supported")
        seq = ids[row, real]
        bad = (seq < 0) | ((seq >= vocab_size) & (seq != image_token_id))
        if bool(bad.any()):
            raise ValueError(f"input_ids row {row} holds ids outside the vocabulary (size {vocab_size})")
        prompts.append(seq)
        if types is not None:
            kept_types.append(types[row, real])
    sizes = merged.get("image_sizes")
    if sizes is not None:
        sizes = _tensor(sizes, "image_sizes", 2, integer=True).detach().cpu().long()
        if tuple(sizes.shape) != (b, 2) or bool((sizes < 1).any()):
            raise ValueError(f"image_sizes must be positive [B, 2] = [{b}, 2] (height, width), got "
                             f"{tuple(sizes.shape)}")
    extra = {k: merged[k] for k in extra_keys if merged.get(k) is not None}
    return VLMInputs(pixels, prompts, kept_types if types is not None else None, sizes, extra)


def tokenize_answers(answers: Any, tokenizer: Any, vocab_size: int, image_token_id: int) -> list[torch.Tensor]:
    """The P answers as 1-D LongTensors of token ids.

    Strings are tokenised with ``tokenizer`` (a processor's ``.tokenizer`` is used if it has one), without
    special tokens; tensors (or lists of ints) are used as given.

    Raises:
        TypeError, ValueError: for no answers, an empty answer, ids outside the vocabulary, the image token
            in an answer, or a string answer without a tokenizer.
    """
    if isinstance(answers, (str, torch.Tensor)):
        answers = [answers]
    if not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of strings or 1-D LongTensors of token ids, e.g. "
                         "answers=['a cat', 'a dog']")
    out = []
    for i, ans in enumerate(answers):
        if isinstance(ans, str):
            if tokenizer is None:
                raise ValueError("string answers need a tokenizer: LeWrapper(model, tokenizer=processor), or pass "
                                 "the answers as token ids")
            tok = getattr(tokenizer, "tokenizer", tokenizer)
            ids = torch.tensor(list(tok(ans, add_special_tokens=False)["input_ids"]), dtype=torch.long)
        elif isinstance(ans, torch.Tensor) or (isinstance(ans, Sequence) and all(
                isinstance(v, int) and not isinstance(v, bool) for v in ans)):
            ids = torch.as_tensor(ans)
            if ids.is_floating_point() or ids.dtype == torch.bool or ids.ndim != 1:
                raise TypeError(f"answer {i} must be a 1-D integer tensor of token ids, got {ids.dtype} "
                                f"{tuple(ids.shape)}")
            ids = ids.detach().cpu().long()
        else:
            raise TypeError(f"answer {i} must be a string or a 1-D LongTensor of token ids, got {type(ans).__name__}")
        if ids.numel() == 0:
            raise ValueError(f"answer {i} has no token")
        if bool(((ids < 0) | (ids >= vocab_size)).any()):
            raise ValueError(f"answer {i} holds token ids outside the vocabulary (size {vocab_size})")
        if bool((ids == image_token_id).any()):
            raise ValueError(f"answer {i} contains the image token id {image_token_id}")
        out.append(ids)
    return out


@dataclass
class Packed:
    """A chunk of sequences for the language model (all on CPU; the caller moves them).

    Attributes:
        ids: ``[n, L]`` token ids (image tokens and padding replaced by ``safe_id``: embedded, then overwritten
            or masked).
        mask: ``[n, L]`` attention mask (right padding).
        token_types: ``[n, L]`` or None; the answer and padding get type 1 (the causal suffix).
        image: ``[n, L]`` bool, the image-token positions.
        pred: ``[n, T]`` position whose output predicts each answer token.
        target: ``[n, T]`` the answer tokens.
        weight: ``[n, T]`` float, which answer tokens count in the score (0 for padding).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    token_types: torch.Tensor | None
    image: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def pack(items: Sequence[tuple[int, int, int | None]], call: VLMInputs, answers: Sequence[torch.Tensor],
         image_token_id: int, safe_id: int) -> Packed:
    """Sequences ``prompt[b] + answer[p]``, right-padded, one per item.

    Args:
        items: ``(b, p, token)``: image/prompt row b, answer p, and None (the whole answer's log-prob) or the
            one answer token whose log-prob is scored (per-token maps).
        call: the validated inputs.
        answers: the answers' token ids.
        image_token_id: the image placeholder id.
        safe_id: an in-vocabulary id for the placeholder and padding positions.
    """
    lengths = [len(call.prompts[b]) + len(answers[p]) for b, p, _ in items]
    n, width, t_max = len(items), max(lengths), max(len(answers[p]) for _, p, _ in items)
    ids = torch.full((n, width), safe_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    types = None if call.token_types is None else torch.ones(n, width, dtype=torch.long)
    image = torch.zeros(n, width, dtype=torch.bool)
    pred = torch.zeros(n, t_max, dtype=torch.long)
    target = torch.zeros(n, t_max, dtype=torch.long)
    weight = torch.zeros(n, t_max)
    for i, (b, p, token) in enumerate(items):
        prompt, ans = call.prompts[b], answers[p]
        k, t = len(prompt), len(ans)
        seq = torch.cat([prompt, ans])
        image[i, : k] = prompt == image_token_id
        ids[i, : k + t] = torch.where(seq == image_token_id, safe_id, seq)
        mask[i, : k + t] = 1
        if types is not None:
            types[i, : k] = call.token_types[b]
        pred[i, :t] = torch.arange(k - 1, k + t - 1)
        target[i, :t] = ans
        if token is None:
            weight[i, :t] = 1.0
        else:
            weight[i, token] = 1.0
    return Packed(ids, mask, types, image, pred, target, weight)


def answer_logprobs(hidden: torch.Tensor, seqs: Packed, head: nn.Module, cap: float | None) -> torch.Tensor:
    """The summed log-probabilities of the packed sequences' counted answer tokens.

    Args:
        hidden: ``[n, L, D]`` the language model's last hidden states.
        seqs: the packed sequences (:func:`pack`): which positions predict which answer tokens, and their weights.
        head: the model's output embeddings (the LM head), applied only at the predicting positions.
        cap: the final logit soft-capping (Gemma 2), or None.

    Returns:
        ``[n]`` float32 log-probabilities.
    """
    device = hidden.device
    h = hidden.gather(1, seqs.pred.to(device)[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = linear(head, h)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = logits.float().log_softmax(-1).gather(-1, seqs.target.to(device)[..., None])[..., 0]
    return (logp * seqs.weight.to(device)).sum(-1)
