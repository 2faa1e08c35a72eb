"""Memory of a LeGrad call: the relevance working-set plan and the pre-flight bounds.

The relevance working set (the prompts' ``dS/dO`` and the ``[chunk, B, heads, block, Nk]`` gradient
block) is bounded by :data:`DEFAULT_WORK_BYTES`: :func:`plan_blocks` picks the prompt chunk and the
query block. Before any work, a token limit and a memory estimate are checked (:func:`check_call`).

The estimate follows the engine's own formula: the re-run tower's activations (a few ``[B, N, C]``
and ``[B, N, 4C]`` tensors, the explained layer's graph included), the relevance working set (the
batched backward's own activations included), the output maps and min-max's temporaries, plus a safety
margin for what the allocator holds on top of live tensors. It is an upper bound of the *extra* peak
memory of one call (measured against peak RSS on five tower families in ``bench/bench_memory_estimate.py``
and ``tests/test_budget_upper_bound.py``; ratios in ``docs/performance.md``), compared with a budget:
``max_memory`` if given, otherwise a fraction of what the device has available (``MemAvailable`` of
``/proc/meminfo`` on CPU, ``torch.cuda.mem_get_info`` on CUDA).
"""

from __future__ import annotations

import torch

from .step import LayerStep

__all__ = [
    "DEFAULT_WORK_BYTES",
    "DEFAULT_CHUNK_BYTES",
    "plan_blocks",
    "step_bytes",
    "MemoryBudgetError",
    "DEFAULT_MAX_TOKENS",
    "AVAILABLE_FRACTION",
    "available_memory",
    "estimate_call_bytes",
    "check_call",
    "answer_sequence_bytes",
    "sequences_per_pass",
]

#: Default limit on patch tokens per image (e.g. 1024x1024 px at patch 8, 2048x2048 px at patch 16).
DEFAULT_MAX_TOKENS = 16384
#: Share of the available memory one call may plan to use when no ``max_memory`` is given.
AVAILABLE_FRACTION = 0.8
# Activations of the re-run tower per token and channel (units of ``B * N * C`` elements): the widest
# no-grad block (qkv, MLP hidden and its activation) plus the explained layer's graph and its kept
# queries/keys/values.
_ACT_FACTOR = 32
# The batched backward's own activations per prompt, same units: dS/dO, the MLP hidden's gradient and the
# activation's backward temporaries. The planner counts 8 (:func:`step_bytes`); measured peaks grow by
# about 5-11 units per prompt with GELU and about 25 with QuickGELU (x * sigmoid(1.702 x): several
# [B, N, 4C] temporaries), part of which the safety factor covers.
_BACKWARD_FACTOR = 20
# Output maps: the upsampled maps and min-max's temporaries (x - min, its quotient, zeros, the result), float32.
_MAP_COPIES = 4
# Peak RSS exceeds live tensors: freed blocks the allocator keeps (fragmentation, measured up to ~2x on
# small calls with many explained layers) and per-op workspaces. A factor on the sum and a constant.
_SAFETY_FACTOR = 1.25
_SAFETY_BYTES = 16 * 2**20

#: Default memory budget (bytes) for the relevance working set of one batched backward: the prompts'
#: ``dS/dO`` and the ``[chunk, B, heads, block, Nk]`` gradient block. Prompt chunk and query block are
#: both derived from it (:func:`plan_blocks`).
DEFAULT_WORK_BYTES = 32 * 2**20
#: Former name of :data:`DEFAULT_WORK_BYTES`, kept for callers that import it.
DEFAULT_CHUNK_BYTES = DEFAULT_WORK_BYTES
#: Query rows below which a block's matmul stops being efficient; the planner shrinks the prompt
#: chunk before it shrinks blocks below this.
_MIN_EFFICIENT_BLOCK = 64


def step_bytes(step: LayerStep) -> tuple[int, int]:
    """``(fixed, per_row)`` bytes per prompt: the batched backward's activations and ``dS/dO`` (fixed),
    and one query row of the ``[B, heads, rows, Nk]`` gradient block (per row)."""
    b, h, nq, hd = step.out.shape
    nk = step.value.shape[2]
    elt = step.out.element_size()
    # dS/dO plus the batched backward's own activations (~ a few [B, N, 4C] tensors per prompt).
    fixed = b * 8 * nq * h * hd * elt
    per_row = b * h * nk * elt
    return fixed, per_row


def plan_blocks(num_prompts: int, num_queries: int, fixed: int, per_row: int, budget: int = DEFAULT_WORK_BYTES,
                prompt_chunk: int | None = None) -> tuple[int, int]:
    """Prompt chunk and query block sizes whose working set fits ``budget``.

    The working set of one chunk is ``chunk * (fixed + block * per_row)``. All prompts and all rows
    at once when that fits; otherwise prompts are chunked down to keep blocks of at least
    ``_MIN_EFFICIENT_BLOCK`` rows, then the block shrinks, never below ``_MIN_EFFICIENT_BLOCK`` rows
    (or all rows, if fewer): below that, time grows much faster than memory shrinks.

    Args:
        num_prompts: prompts of the call (P).
        num_queries: query rows of the explained attention (Nq).
        fixed: bytes per prompt that do not depend on the block (see :func:`step_bytes`).
        per_row: bytes per prompt and query row of the gradient block.
        budget: bytes.
        prompt_chunk: fixes the chunk (the block is still derived from the budget).

    Returns:
        ``(chunk, block)``, both >= 1.
    """
    if prompt_chunk is not None:
        chunk = max(1, min(prompt_chunk, num_prompts))
    elif num_prompts * (fixed + num_queries * per_row) <= budget:
        return num_prompts, num_queries
    else:
        min_block = min(num_queries, _MIN_EFFICIENT_BLOCK)
        chunk = max(1, min(num_prompts, budget // max(fixed + min_block * per_row, 1)))
    block = (budget // chunk - fixed) // max(per_row, 1)
    # Never below an efficient block: when one prompt's fixed part alone exceeds the budget, rows of one
    # would multiply the matmul count for little memory (a block of _MIN_EFFICIENT_BLOCK rows costs far
    # less than ``fixed`` at any size).
    return chunk, int(min(num_queries, max(block, _MIN_EFFICIENT_BLOCK, 1)))


class MemoryBudgetError(ValueError, MemoryError):
    """A call would need more memory than its budget (raised before any work).

    A ``ValueError`` (bad request size, with the fix in the message) and a ``MemoryError`` (so that code
    isolating out-of-memory failures catches it too).
    """


def available_memory(device: torch.device) -> int | None:
    """Bytes the device can still provide, or None when unknown.

    CPU: ``MemAvailable`` from ``/proc/meminfo`` (Linux). CUDA: free device memory plus what PyTorch's
    caching allocator holds but does not use.
    """
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
        except (RuntimeError, AssertionError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_call_bytes(batch: int, tokens: int, width: int, prompts: int, out_pixels: int,
                        element_size: int = 4, work_bytes: int | None = None) -> int:
    """Upper bound of the extra peak memory of one LeGrad call, in bytes.

    The sum of the phases' peaks (they need not overlap, but memory an earlier phase freed is often not
    given back to the system), times a safety margin for the allocator, plus a constant.

    Args:
        batch: images B.
        tokens: tokens per image N (prefix tokens included).
        width: the tower's token width C.
        prompts: prompts P (the empty prompt of the correction included).
        out_pixels: pixels of one output map (``H * W``).
        element_size: bytes per element of the explained layers' dtype.
        work_bytes: relevance working-set budget (None: :data:`DEFAULT_WORK_BYTES`).

    Returns:
        Bytes: ``1.25 * (activations + relevance working set + output maps + input copy) + 16 MiB``.
    """
    work = DEFAULT_WORK_BYTES if work_bytes is None else work_bytes
    unit = batch * tokens * width * element_size  # one [B, N, C] tensor
    act = unit * _ACT_FACTOR
    # The relevance working set as the planner counts it (8 units per prompt for its backward, plus the
    # [chunk, B, heads, block, N] gradient block; heads taken as width / 32, no smaller head width is in
    # use): all prompts and rows when they fit ``work``, else at most ``work``, never less than one
    # prompt with 64 rows.
    heads = max(1, width // 32)
    planned_all = prompts * (8 * unit + batch * heads * tokens * tokens * element_size)
    planned_least = 8 * unit + batch * heads * min(tokens, 64) * tokens * element_size
    planned = max(min(work, planned_all), planned_least)
    # What the backward holds beyond the planner's 8 units, for each prompt of the largest chunk.
    chunk = max(1, min(prompts, work // max(8 * unit, 1)))
    backward_extra = chunk * (_BACKWARD_FACTOR - 8) * unit
    relevance = batch * prompts * tokens * element_size
    maps = batch * prompts * out_pixels * 4 * _MAP_COPIES
    pixels = batch * 3 * out_pixels * 4  # the input moved/cast for the tower (about the output size)
    live = act + planned + backward_extra + relevance + maps + pixels
    return int(_SAFETY_FACTOR * live + _SAFETY_BYTES)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def check_call(*, batch: int, tokens: int, patches: int, width: int, prompts: int, out_pixels: int,
               element_size: int, device: torch.device, max_memory: float | None, max_tokens: int | None) -> None:
    """Raises before any work if one image has too many patches or the call would not fit in memory.

    Args:
        batch, tokens, width, prompts, out_pixels, element_size: as for :func:`estimate_call_bytes`.
        patches: patch tokens per image (what ``max_tokens`` limits).
        device: where the tower runs.
        max_memory: budget in bytes; None for :data:`AVAILABLE_FRACTION` of :func:`available_memory`.
        max_tokens: limit on ``patches``; None for no limit.

    Raises:
        ValueError: if ``patches`` exceeds ``max_tokens``.
        MemoryBudgetError: if the estimate exceeds the budget.
    """
    if max_tokens is not None and patches > max_tokens:
        raise ValueError(
            f"the image has {patches} patch tokens, more than max_tokens={max_tokens}; use a smaller image size "
            f"(about {max_tokens} patches, e.g. {int(max_tokens ** 0.5)}x{int(max_tokens ** 0.5)} patches) or raise "
            "the limit with LeWrapper(..., max_tokens=N) (None: no limit)"
        )
    need = estimate_call_bytes(batch, tokens, width, prompts, out_pixels, element_size)
    if max_memory is not None:
        budget, source = float(max_memory), f"max_memory={max_memory:.0f} bytes"
    else:
        avail = available_memory(device)
        if avail is None:
            return
        budget = AVAILABLE_FRACTION * avail
        source = f"{AVAILABLE_FRACTION:.0%} of the {_mib(avail)} available on {device.type}"
    if need > budget:
        raise MemoryBudgetError(
            f"this call needs about {_mib(need)} of extra memory ({batch} image(s) of {tokens} tokens, {prompts} "
            f"prompt(s)), more than its budget ({source}); use a smaller image size, fewer images or prompts per "
            "call, or set LeWrapper(..., max_memory=BYTES)"
        )


def answer_sequence_bytes(*, length: int, answer_length: int, lm_layers: int, lm_width: int, lm_inner: int,
                          vocab: int, lm_element_size: int, tile_tokens: int, tower_width: int, tower_heads: int,
                          tiles_per_sequence: int, tiles_total: int) -> tuple[int, int]:
    """``(fixed, per sequence)`` upper estimates of the extra memory of a vision-language model's answer
    explanation (:class:`legrad.adapters.vlm.VLMAdapter`), in bytes.

    Per (image, answer) sequence: the activations the language model keeps for the backward (attention, MLP,
    norms, residuals), the explained vision block's graph for the sequence's tiles (float32), the answer
    logits (float32 log-softmax) and the relevance block. Fixed: the tower's run over every tile. The factors
    are calibrated on bench/bench_vlm.py's measured peak (7B-shaped LLaVA, bfloat16: 1.2 GiB for 2 x 600
    tokens), with some margin.

    Args:
        length: tokens of the longest sequence (prompt + answer).
        answer_length: tokens of the longest answer.
        lm_layers, lm_width, lm_inner, vocab: the language model's depth, hidden and MLP sizes, vocabulary.
        lm_element_size: bytes per element of the language model's dtype.
        tile_tokens: tokens of one tile's sequence in the vision tower (prefix included).
        tower_width, tower_heads: the vision tower's width and heads.
        tiles_per_sequence: the most tiles (tower rows) one image has.
        tiles_total: tower rows of the whole call.
    """
    lm = length * lm_layers * (36 * lm_width + 10 * lm_inner) * lm_element_size
    per_tile = tile_tokens * tower_width * 4 * 24 + tower_heads * tile_tokens * tile_tokens * 4
    logits = answer_length * vocab * 4 * 3
    per_sequence = lm + tiles_per_sequence * per_tile + logits + length * lm_width * lm_element_size * 2
    return tiles_total * per_tile, per_sequence


def sequences_per_pass(n: int, fixed: int, per_sequence: int, device: torch.device, max_memory: float | None,
                       chunk: int | None) -> int:
    """Sequences per language-model pass that fit the budget (``max_memory``, else :data:`AVAILABLE_FRACTION`
    of :func:`available_memory`), or ``chunk`` when given.

    Raises:
        MemoryBudgetError: when one sequence alone does not fit (before any work).
    """
    avail = available_memory(device) if max_memory is None else None
    limit = float(max_memory) if max_memory is not None else (None if avail is None else AVAILABLE_FRACTION * avail)
    if limit is not None and fixed + per_sequence > limit:
        raise MemoryBudgetError(
            f"one (image, answer) sequence needs about {_mib(fixed + per_sequence)} of extra memory, more than the "
            f"budget of {_mib(limit)}; use fewer images per call, shorter prompts or answers, or set "
            "LeWrapper(..., max_memory=BYTES)")
    if chunk is not None:
        return min(chunk, n)
    if limit is None:
        return n
    return max(1, min(n, int((limit - fixed) // per_sequence)))
