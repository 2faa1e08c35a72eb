"""LeGrad for the answer of a vision-language model (:class:`VLMAdapter`): which image patches raised the
log-probability of a candidate answer.

For each explained block ``b`` of the vision tower (one of the blocks that feed the image features):

    s_b = sum over the answer's tokens of log p(token | image, prompt, previous answer tokens),
          with the image features computed from block b's output tokens,
    m_b = mean over heads and query rows of relu(d s_b / d A_b), prefix (CLS) columns dropped,

summed over the explained blocks on the patch grid, then upsampled and min-max normalised per
(image, answer) by :func:`legrad.engine.maps.grid_maps`. ``d s / d A = (d s / d O) V^T`` (``O = A V``), so
the per-head attention output ``O`` is the leaf that requires grad, as in :mod:`legrad.engine.relevance`.

The vision tower runs once, statelessly from its weights (the explained blocks in float32); the
language model runs its own ``forward`` (in its own dtype and attention implementation) once per
explained block on every (image, answer) sequence at once, chunked by a memory budget, with one backward
per chunk. Each sequence is the row's real prompt tokens with the answer right after them, right-padded,
so padding of either side never changes a score.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...engine import budget
from ...engine.deadline import check_deadline
from ...engine.maps import grid_maps
from ...engine.relevance import NonFiniteError
from ...engine.validation import check_layer_index, check_output_size, check_prompt_chunk
from ...ops.functional import linear
from ..base import TowerAdapter
from ..hf.common import hf_block
from ..runner import after_attention, attention, plain_block
from .inputs import VLMInputs, pack, read_inputs, tokenize_answers

__all__ = ["VLMAdapter", "VisionBlock"]


@dataclass
class VisionBlock:
    """One explained block's attention, computed once per call (float32, no grad).

    Attributes:
        layer: the block index.
        x: ``[B, N, C]`` the block's input tokens.
        out: ``[B, H, N, hd]`` per-head attention output ``O = A V``.
        value: ``[B, H, N, hd]`` the values ``V``.
    """

    layer: int
    x: torch.Tensor
    out: torch.Tensor
    value: torch.Tensor


class VLMAdapter(TowerAdapter):
    """Common part of the VLM families: answers scored by the language model, explained on the vision tower.

    Subclasses set ``family``, ``model_class`` and implement :meth:`_feeding_blocks`, :meth:`_embed` and
    :meth:`_features` (and may override :meth:`_lm_hidden`).
    """

    entry_points = ("compute_legrad",)
    scorer: ClassVar[str] = "answer"
    #: The transformers class name this adapter handles.
    model_class: ClassVar[str] = ""
    #: Prefix (CLS) tokens of the vision tower's sequence.
    prefix_tokens: ClassVar[int] = 0

    def __init__(self, model: nn.Module):
        tower = model.model.vision_tower
        super().__init__(getattr(tower, "vision_model", tower))
        self.model = model
        self._check()

    @classmethod
    def matches(cls, visual: nn.Module) -> bool:
        return False

    @classmethod
    def from_model(cls, model: nn.Module) -> TowerAdapter | None:
        if not any(c.__name__ == cls.model_class and c.__module__.startswith("transformers.")
                   for c in type(model).__mro__):
            return None
        return cls(model)

    def _check(self) -> None:
        v = self.visual
        attrs = ("layer_norm1", "self_attn", "layer_norm2", "mlp")
        if not (hasattr(v, "embeddings") and hasattr(v, "encoder")
                and all(all(hasattr(blk, a) for a in attrs) for blk in v.encoder.layers)):
            raise TypeError(f"{type(self.model).__name__}'s vision tower does not have the CLIP/SigLIP layout legrad "
                            "expects (embeddings, encoder.layers[*].self_attn/mlp/layer_norm1/2)")
        if self.depth < 1:
            raise ValueError(f"{type(self.model).__name__}: no vision block feeds the image features")

    # ------------------------------------------------------------------ family hooks
    def _feeding_blocks(self) -> int:
        """How many blocks (from the first) feed the image features."""
        raise NotImplementedError

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Tokens before block 0, ``[B, N, C]``."""
        raise NotImplementedError

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        """Image features ``[n, N_img, D]`` from a feeding block's output tokens ``y`` ``[n, N, C]``."""
        raise NotImplementedError

    def _lm_hidden(self, embeds: torch.Tensor, mask: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
        """Last hidden states ``[n, L, D]`` of the language model, through the VLM's own base-model forward
        (its masks and positions: PaliGemma's prefix attention from ``token_type_ids``)."""
        kwargs = {} if types is None else {"token_type_ids": types}
        return self.model.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False, **kwargs)[0]

    # ------------------------------------------------------------------ tower facts
    @property
    def depth(self) -> int:
        """Blocks that feed the image features (``layer_index`` counts within them)."""
        return self._feeding_blocks()

    @property
    def patch_size(self) -> tuple[int, int]:
        p = self.visual.config.patch_size
        return (p, p) if isinstance(p, int) else tuple(p)

    @property
    def embed_dim(self) -> int:
        return self.text_config.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix_tokens

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def _grid(self) -> tuple[int, int]:
        size = self.visual.config.image_size
        ph, pw = self.patch_size
        return size // ph, size // pw

    def steps(self, image: Any, start: int, compute_dtype: torch.dtype) -> Iterator[Any]:
        raise TypeError(f"{self.family} explains answers: use compute_legrad(image=inputs, answers=[...])")

    def prepare_inputs(self, image: Any, **inputs: Any) -> Any:
        raise TypeError(f"{self.family} explains answers: use compute_legrad(image=inputs, answers=[...])")

    # ------------------------------------------------------------------ the call
    #: Dimensions of ``pixel_values`` (5 for any-resolution families: ``[B, tiles, C, H, W]``).
    pixel_ndim: ClassVar[int] = 4

    def _validate(self, image: Any, inputs: dict[str, Any], answers: Any, tokenizer: Any) -> tuple[VLMInputs, list]:
        call = read_inputs(image, inputs, self.image_token_id, self.text_config.vocab_size, self.pixel_ndim)
        size = self.visual.config.image_size
        c = self.visual.config.num_channels
        if tuple(call.pixel_values.shape[-3:]) != (c, size, size):
            raise ValueError(f"pixel_values must be [B, {c}, {size}, {size}] for this model, got "
                             f"{tuple(call.pixel_values.shape)}; use the model's processor")
        self._check_call(call)
        for row, prompt in enumerate(call.prompts):
            got = int((prompt == self.image_token_id).sum())
            n_img = self._num_image_tokens(call, row)
            if got != n_img:
                raise ValueError(f"prompt {row} holds {got} image tokens; this model expects {n_img} (one image, as "
                                 "the processor expands it)")
        if any(m.training for m in self.model.modules()):
            raise ValueError("the VLM is in training mode (dropout would make the maps random); call model.eval()")
        return call, tokenize_answers(answers, tokenizer, self.text_config.vocab_size, self.image_token_id)

    def _check_call(self, call: VLMInputs) -> None:
        """Family-specific checks of a call (before any work)."""

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        """Image placeholder tokens of prompt ``row`` (= image feature rows)."""
        gh, gw = self._grid()
        return gh * gw

    def _tile_rows(self, call: VLMInputs) -> list[list[int]]:
        """Rows of the tower's input batch (:meth:`_tower_pixels`) that belong to each image."""
        return [[b] for b in range(call.batch)]

    def _tower_pixels(self, call: VLMInputs) -> torch.Tensor:
        """``[tiles, C, H, W]``: what the vision tower runs on."""
        return call.pixel_values

    def _image_features(self, y: torch.Tensor, images: list[int], counts: list[int], call: VLMInputs) -> torch.Tensor:
        """Features ``[tokens, D]`` of a chunk's sequences, in order, from its tiles' block outputs ``y``."""
        feats = self._features(y)
        return feats.reshape(-1, feats.shape[-1])

    def _image_map(self, rel: torch.Tensor, b: int, call: VLMInputs) -> torch.Tensor:
        """Relevance of one (image, answer) on its image: ``[tiles, patches]`` -> ``[gh, gw]``."""
        return rel.reshape(self._grid())

    def _map_size(self, b: int, call: VLMInputs) -> tuple[int, int]:
        """``(H, W)`` of image ``b``'s maps when ``output_size`` is None."""
        return tuple(call.pixel_values.shape[-2:])

    def _safe_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        return pad if isinstance(pad, int) and 0 <= pad < self.text_config.vocab_size else 0

    def _item_bytes(self, call: VLMInputs, answers: list[torch.Tensor]) -> tuple[int, int]:
        """``(fixed, per sequence)`` upper estimates of the extra memory, in bytes."""
        tc = self.text_config
        elt = next(self.model.model.language_model.parameters()).element_size()
        length = max(len(p) for p in call.prompts) + max(len(a) for a in answers)
        inter = getattr(tc, "intermediate_size", 4 * tc.hidden_size) or 4 * tc.hidden_size
        layers = tc.num_hidden_layers
        # Activations the language model keeps for the backward (attention, MLP, norms, residuals), the vision
        # block's graph (float32), the answer logits (float32 log-softmax) and the relevance block. The factors
        # are calibrated on bench/bench_vlm.py's measured peak (7B-shaped LLaVA, bfloat16: 1.2 GiB for 2 x 600
        # tokens), with some margin.
        lm = length * layers * (36 * tc.hidden_size + 10 * inter) * elt
        tok, tiles = self._tokens_per_image(), self._tile_rows(call)
        width, heads = self.visual.config.hidden_size, self.visual.config.num_attention_heads
        per_tile = tok * width * 4 * 24 + heads * tok * tok * 4  # a float32 block's graph, or its attention
        vision = max(len(t) for t in tiles) * per_tile
        logits = max(len(a) for a in answers) * tc.vocab_size * 4 * 3
        fixed = sum(len(t) for t in tiles) * per_tile  # the tower's run over every tile
        return fixed, lm + vision + logits + length * tc.hidden_size * elt * 2

    def _tokens_per_image(self) -> int:
        gh, gw = self._grid()
        return gh * gw + self.prefix_tokens

    def _chunk(self, n_items: int, call: VLMInputs, answers: list, chunk: int | None, max_memory: float | None,
               max_tokens: int | None) -> int:
        patches = max(len(t) for t in self._tile_rows(call)) * (self._tokens_per_image() - self.prefix_tokens)
        if max_tokens is not None and patches > max_tokens:
            raise ValueError(f"the image has {patches} patch tokens, more than max_tokens={max_tokens}")
        fixed, per_item = self._item_bytes(call, answers)
        avail = budget.available_memory(self.device()) if max_memory is None else None
        limit = float(max_memory) if max_memory is not None else (
            None if avail is None else budget.AVAILABLE_FRACTION * avail)
        if limit is not None and fixed + per_item > limit:
            raise budget.MemoryBudgetError(
                f"one (image, answer) sequence needs about {(fixed + per_item) / 2**20:,.0f} MiB of extra memory, "
                f"more than the budget of {limit / 2**20:,.0f} MiB; use fewer images per call, shorter prompts or "
                "answers, or set LeWrapper(..., max_memory=BYTES)")
        if chunk is not None:
            return min(chunk, n_items)
        if limit is None:
            return n_items
        return max(1, min(n_items, int((limit - fixed) // per_item)))

    def explain(self, image: Any, answers: Any, *, layer_index: int, output_size: Any = None,
                prompt_chunk: int | None = None, tokenizer: Any = None, max_memory: float | None = None,
                max_tokens: int | None = None, per_token: bool = False, return_scores: bool = False,
                **inputs: Any) -> Any:
        """LeGrad maps of candidate answers (see the module docstring and docs/vlm.md).

        Args:
            image: the processor output (``pixel_values``, ``input_ids``, ``attention_mask``, ...).
            answers: P strings (tokenised with ``tokenizer``, no special tokens) or 1-D LongTensors of ids.
            layer_index: first explained block among the blocks that feed the image features (negative:
                from the last feeding block).
            output_size: None (the ``pixel_values`` size), ``"grid"`` or ``(h, w)``.
            prompt_chunk: sequences per language-model pass (None: from the memory budget).
            tokenizer: the processor or tokenizer for string answers.
            max_memory: budget in bytes (None: 80% of what the device has available).
            max_tokens: limit on patch tokens per image.
            per_token: one map per token of a single answer (its own log-prob) instead of one per answer.
            return_scores: also return the answers' summed log-probabilities ``[B, P]`` under the unchanged
                model (``[B, T]`` token log-probs with ``per_token``): the last feeding block is always
                explained, and its score is the model's own, so they come at no extra cost.
            **inputs: processor keys given separately (``input_ids=...``).

        Returns:
            ``[B, P, H, W]`` float32 maps in [0, 1] (``[B, T, H, W]`` with ``per_token``: T answer tokens); a
            list of ``[P, H_b, W_b]`` when the images' map sizes differ (LLaVA-NeXT images of different sizes);
            ``(maps, scores)`` with ``return_scores``.

        Raises:
            TypeError, ValueError: on invalid inputs, before any work.
            legrad.engine.budget.MemoryBudgetError: if one sequence would not fit the memory budget.
        """
        output_size = check_output_size(output_size)
        chunk = check_prompt_chunk(prompt_chunk)
        start = check_layer_index(layer_index, self.depth) % self.depth
        call, ids = self._validate(image, inputs, answers, tokenizer)
        if not isinstance(per_token, bool):
            raise TypeError(f"per_token must be True or False, got {per_token!r}")
        if per_token:
            if len(ids) != 1:
                raise ValueError(f"per_token maps explain one answer; got {len(ids)} answers")
            items = [(b, 0, t) for b in range(call.batch) for t in range(len(ids[0]))]
        else:
            items = [(b, p, None) for b in range(call.batch) for p in range(len(ids))]
        cols = len(items) // call.batch
        chunk = self._chunk(len(items), call, ids, chunk, max_memory, max_tokens)
        out_device = call.pixel_values.device
        with torch.inference_mode(False), torch.no_grad():
            rels, scores = self._relevance(call, ids, items, start, chunk)
            grids = [self._image_map(rels[b * cols + j], b, call) for b in range(call.batch) for j in range(cols)]
            width = max(g.numel() for g in grids)
            rel = torch.zeros(len(grids), width, device=grids[0].device)
            for i, g in enumerate(grids):
                rel[i, : g.numel()] = g.flatten()
            shapes = [tuple(grids[b * cols].shape) for b in range(call.batch)]
            sizes = [self._map_size(b, call) for b in range(call.batch)]
            maps = grid_maps(rel.reshape(call.batch, cols, width), shapes, sizes, output_size)
        maps = [m.to(out_device) for m in maps] if isinstance(maps, list) else maps.to(out_device)
        if return_scores:
            return maps, scores.reshape(call.batch, cols).to(out_device)
        return maps

    def _blocks(self) -> list:
        return [hf_block(layer) for layer in self.visual.encoder.layers]

    def _vision_blocks(self, pixels: torch.Tensor, start: int) -> Iterator[VisionBlock]:
        blocks = self._blocks()
        x = self._embed(pixels)
        for i in range(start):
            x = plain_block(blocks[i], x)
        x = x.float()  # the explained blocks run in float32
        for i in range(start, self.depth):
            h, _, _, v, o = attention(blocks[i], x)
            yield VisionBlock(i, x, o, v)
            x = after_attention(blocks[i], x, h, o)

    def _block_output(self, layer: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        return after_attention(hf_block(self.visual.encoder.layers[layer]), x, None, o)

    def _relevance(self, call: VLMInputs, answers: list[torch.Tensor], items: list, start: int,
                   chunk: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per item, ``[tiles, patches]`` relevance summed over the explained blocks, and the items' scores
        ``[n]`` at the last feeding block (the unchanged model's)."""
        device = self.device()
        lm_dtype = next(self.model.model.language_model.parameters()).dtype
        pixels = self._tower_pixels(call).detach().to(device=device, dtype=self.param_dtype())
        pixels = pixels.clone() if pixels.is_inference() else pixels
        embed = self.model.get_input_embeddings()
        tiles = self._tile_rows(call)
        total: list[Any] = [0.0] * len(items)
        scores = torch.zeros(len(items), device=device)
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        packed = [pack(c, call, answers, self.image_token_id, self._safe_id()) for c in chunks]
        for block in self._vision_blocks(pixels, start):
            lo = 0
            for part, seqs in zip(chunks, packed):
                check_deadline()  # a caller's time limit (legrad.engine.deadline), between language-model runs
                images = [b for b, _, _ in part]
                rows = torch.tensor([r for b in images for r in tiles[b]], device=device)
                counts = [len(tiles[b]) for b in images]
                feats = functools.partial(self._image_features, images=images, counts=counts, call=call)
                rel, score = self._chunk_relevance(block, rows, feats, seqs, embed, lm_dtype, device)
                if block.layer == self.depth - 1:
                    scores[lo:lo + len(part)] = score
                for i, piece in enumerate(rel.split(counts)):
                    total[lo + i] = total[lo + i] + piece
                lo += len(part)
        return total, scores

    def _chunk_relevance(self, block: VisionBlock, rows: torch.Tensor, features: Any, seqs: Any, embed: nn.Module,
                         lm_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        ids, mask = seqs.ids.to(device), seqs.mask.to(device)
        types = None if seqs.token_types is None else seqs.token_types.to(device)
        base = embed(ids).detach()
        o = block.out[rows].clone().requires_grad_(True)
        with torch.enable_grad():
            feats = features(self._block_output(block.layer, block.x[rows], o)).to(lm_dtype)
            embeds = base.masked_scatter(seqs.image.to(device)[..., None], feats)
            scores = self._answer_scores(self._lm_hidden(embeds, mask, types), seqs)
            total = scores.sum()  # each sequence's score depends only on its own copy of O
        if not bool(torch.isfinite(scores).all()):
            raise NonFiniteError("the answers' log-probabilities are not finite (numeric overflow in the model)")
        (d_out,) = torch.autograd.grad(total, o)
        v_t = block.value[rows].transpose(-1, -2)
        _, heads, nq, _ = d_out.shape
        rel = torch.zeros(len(rows), v_t.shape[-1], device=device)
        step = max(1, 2**24 // max(1, len(rows) * heads * v_t.shape[-1]))  # bounds the [n, H, rows, N] block
        for q0 in range(0, nq, step):
            rel += (d_out[:, :, q0:q0 + step] @ v_t).clamp_min_(0).sum(dim=(1, 2))
        rel = rel / (heads * nq)
        if not bool(torch.isfinite(rel).all()):
            raise NonFiniteError("the attention gradients are not finite (numeric overflow in the model)")
        return rel[:, self.prefix_tokens:], scores.detach()

    def _answer_scores(self, hidden: torch.Tensor, seqs: Any) -> torch.Tensor:
        """``[n]`` summed log-probs of the counted answer tokens from the last hidden states ``[n, L, D]``; the
        head (and Gemma 2's final soft-capping) only on the positions that predict answer tokens."""
        device = hidden.device
        pred = seqs.pred.to(device)
        h = hidden.gather(1, pred[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = linear(self.model.get_output_embeddings(), h)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logp = logits.float().log_softmax(-1).gather(-1, seqs.target.to(device)[..., None])[..., 0]
        return (logp * seqs.weight.to(device)).sum(-1)

    def score(self, image: Any, answers: Any, tokenizer: Any = None, **inputs: Any) -> torch.Tensor:
        """The answers' summed log-probabilities ``[B, P]`` under the unchanged model (no maps), for checks.

        Raises:
            TypeError, ValueError: on invalid inputs.
        """
        call, ids = self._validate(image, inputs, answers, tokenizer)
        items = [(b, p, None) for b in range(call.batch) for p in range(len(ids))]
        device = self.device()
        with torch.inference_mode(False), torch.no_grad():
            pixels = self._tower_pixels(call).to(device=device, dtype=self.param_dtype())
            x = self._embed(pixels)
            for block in self._blocks()[: self.depth]:  # the blocks that feed the image features
                x = plain_block(block, x)
            tiles = self._tile_rows(call)
            images = [b for b, _, _ in items]
            rows = torch.tensor([r for b in images for r in tiles[b]], device=device)
            feats = self._image_features(x[rows], images, [len(tiles[b]) for b in images], call)
            seqs = pack(items, call, ids, self.image_token_id, self._safe_id())
            lm_dtype = next(self.model.model.language_model.parameters()).dtype
            embeds = self.model.get_input_embeddings()(seqs.ids.to(device)).masked_scatter(
                seqs.image.to(device)[..., None], feats.to(lm_dtype))
            types = None if seqs.token_types is None else seqs.token_types.to(device)
            hidden = self._lm_hidden(embeds, seqs.mask.to(device), types)
            return self._answer_scores(hidden, seqs).reshape(call.batch, len(ids))
