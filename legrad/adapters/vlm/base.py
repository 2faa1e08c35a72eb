"""LeGrad for the answer of a vision-language model (:class:`VLMAdapter`): which image patches raised the
log-probability of a candidate answer.

For each explained block ``b`` of the vision tower (one of the blocks that feed the image features):

    s_b = sum over the answer's tokens of log p(token | image, prompt, previous answer tokens),
          with the image features computed from block b's output tokens through the model's own feature path,
    m_b = mean over heads and query rows of relu(d s_b / d A_b), prefix (CLS) columns dropped,

summed over the explained blocks on the patch grid, then upsampled and min-max normalised per
(image, answer) by :func:`legrad.engine.maps.grid_maps`.

One path with every other tower: the vision tower is declared for the block runner once per tower kind
(:mod:`legrad.adapters.vlm.towers`) and runs statelessly from its weights (the explained blocks in
float32); each explained block hands the engine a :class:`~legrad.engine.step.LayerStep` whose leaf is the
attention output ``O`` of the chunk's sequences (one copy per sequence) and whose feature is the sequences'
scores, so the relevance is :func:`legrad.engine.relevance.layer_relevance`'s. The language model runs its
own ``forward`` (its dtype, attention implementation, masks and positions) with the image features given
as ``mm_encoder_outputs``, on every (image, answer) sequence at once, chunked by the memory budget of
:func:`legrad.engine.budget.answer_sequence_bytes`. Each sequence is the row's real prompt tokens with the
answer right after them, right-padded, so padding of either side never changes a score.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from ...engine import budget
from ...engine.deadline import check_deadline
from ...engine.maps import grid_maps
from ...engine.relevance import NonFiniteError, layer_relevance
from ...engine.step import LayerStep
from ...engine.targets import AnswerScores
from ...engine.validation import check_layer_index, check_output_size, check_prompt_chunk
from ..runner import BlockTower, Run, after_attention, attention, plain_block
from .inputs import Packed, VLMInputs, answer_logprobs, pack, read_inputs, tokenize_answers
from .towers import VisionTower, tower_for
from .version import check_transformers

__all__ = ["VLMAdapter"]


def _answer_scores(feature: torch.Tensor, _: Any) -> torch.Tensor:
    """The engine's scorer for a VLM step: its feature already is the sequences' scores ``[n, 1]``."""
    return feature


class VLMAdapter(BlockTower):
    """Common part of the VLM families: answers scored by the language model, explained on the vision tower.

    Subclasses set ``family``, ``model_class``, ``tower_kind`` and implement :meth:`_vision_module`,
    :meth:`_feeding_blocks` and :meth:`_features` (the model's own feature path from a block's output tokens).
    """

    entry_points = ("compute_legrad",)
    readout_space: ClassVar[AnswerScores] = AnswerScores()
    #: The transformers class name this adapter handles.
    model_class: ClassVar[str] = ""
    #: The vision tower's kind, a key of :data:`~legrad.adapters.vlm.towers.TOWER_KINDS` (declared once, shared by
    #: the families built on it).
    tower_kind: ClassVar[str] = ""
    #: Processor keys the family reads beyond the common ones (``image_grid_thw``...).
    input_keys: ClassVar[tuple[str, ...]] = ()
    #: Whether the model's own head soft-caps its logits by ``text_config.final_logit_softcapping`` (Gemma 2's).
    final_softcap: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        check_transformers()  # before any work: an older forward has no mm_encoder_outputs
        self.model = model
        module = self._vision_module(model)
        self.tower: VisionTower = tower_for(self.tower_kind, module, type(model).__name__)
        super().__init__(module)
        self._check()
        if self.depth < 1:
            raise ValueError(f"{type(self.model).__name__}: no vision block feeds the image features")

    @classmethod
    def from_model(cls, model: nn.Module) -> BlockTower | None:
        if not any(c.__name__ == cls.model_class and c.__module__.startswith("transformers.")
                   for c in type(model).__mro__):
            return None
        return cls(model)

    # ------------------------------------------------------------------ family hooks
    @staticmethod
    def _vision_module(model: nn.Module) -> nn.Module:
        """The vision transformer inside the VLM."""
        tower = model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def _check(self) -> None:
        """Family-specific checks of the model (configuration, projector layout)."""

    def _feeding_blocks(self) -> int:
        """How many blocks (from the first) feed the image features."""
        raise NotImplementedError

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        """Image features ``[n, N_img, D]`` from a feeding block's output tokens ``y`` ``[n, N, C]``."""
        raise NotImplementedError

    def _encoder_output(self, feats: torch.Tensor, call: VLMInputs, images: list[int]) -> Any:
        """``pooler_output`` of the ``mm_encoder_outputs`` the model's forward takes: features ``[tokens, D]`` of
        a chunk's sequences, in order (a tuple: the forwards concatenate the per-image features)."""
        return (feats,)

    def _encoder_outputs(self, feats: torch.Tensor, call: VLMInputs, images: list[int]) -> Any:
        """``mm_encoder_outputs["image"]`` of a chunk's sequences (features ``[tokens, D]``, in order)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(pooler_output=self._encoder_output(feats, call, images))

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        """Further keyword arguments of the model's forward for a chunk (``token_type_ids``, grids)."""
        return {} if seqs.token_types is None else {"token_type_ids": seqs.token_types.to(device)}

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
        return self.tower.prefix

    @property
    def prefix_tokens(self) -> int:
        return self.tower.prefix

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

    def declare(self, image: Any, dtype: torch.dtype) -> Run:
        """The tower's :class:`~legrad.adapters.runner.Run` on its input batch (:meth:`_tower_pixels`)."""
        return self.tower.declare(image, dtype)

    def steps(self, image: Any, start: int, compute_dtype: torch.dtype) -> Iterator[Any]:
        raise TypeError(f"{self.family} explains answers: use compute_legrad(image=inputs, answers=[...])")

    def prepare_inputs(self, image: Any, **inputs: Any) -> Any:
        raise TypeError(f"{self.family} explains answers: use compute_legrad(image=inputs, answers=[...])")

    # ------------------------------------------------------------------ drift guard
    @property
    def native_size(self) -> tuple[int, int]:
        size = self.visual.config.image_size
        return int(size), int(size)

    def probe_input(self) -> Any:
        """Fixed-seed noise at the tower's native size, as the processor would give it (a dict of inputs)."""
        h, w = self.native_size
        noise = torch.randn(1, self.visual.config.num_channels, h, w, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": noise.to(self.device(), self.param_dtype())}

    def own_output(self, model: nn.Module, image: Any) -> torch.Tensor:
        """The model's own ``get_image_features`` on the probe, ``[tokens, D]``."""
        out = model.get_image_features(**image)
        feats = getattr(out, "pooler_output", out)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
        return feats.reshape(-1, feats.shape[-1])

    def _probe_call(self, image: dict[str, Any]) -> VLMInputs:
        return VLMInputs(image["pixel_values"], [torch.zeros(1, dtype=torch.long)], None, image.get("image_sizes"),
                         {k: image[k] for k in self.input_keys if k in image})

    def tower_features(self, image: Any) -> torch.Tensor:
        """legrad's re-run of what :meth:`own_output` returns (:func:`~legrad.adapters.runner.rerun`, the drift
        guard): the declared tower on :meth:`probe_input`'s image, plainly, then the family's feature path."""
        call = self._probe_call(image)
        return self._plain_features(call, [0])

    def _plain_features(self, call: VLMInputs, images: list[int]) -> torch.Tensor:
        """Image features ``[tokens, D]`` of ``images`` (in order, repeats allowed) from the unchanged tower."""
        device = self.device()
        pixels = self._tower_pixels(call)
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.to(device=device, dtype=self.param_dtype())
        run = self.declare(pixels, self.param_dtype())
        x = run.tokens
        for block in run.blocks[: self.depth]:  # the blocks that feed the image features
            x = plain_block(block, x, run)
        tiles = self._tile_rows(call)
        rows = torch.tensor([r for b in images for r in tiles[b]], device=device)
        return self._image_features(x[rows], images, [len(tiles[b]) for b in images], call)

    # ------------------------------------------------------------------ the call
    #: Dimensions of ``pixel_values`` (5 for any-resolution families: ``[B, tiles, C, H, W]``).
    pixel_ndim: ClassVar[int] = 4

    def _validate(self, image: Any, inputs: dict[str, Any], answers: Any, tokenizer: Any) -> tuple[VLMInputs, list]:
        call = read_inputs(image, inputs, self.image_token_id, self.text_config.vocab_size, self.pixel_ndim,
                           self.input_keys)
        self._check_pixels(call)
        self._check_call(call)
        video_token = getattr(self.model.config, "video_token_id", None)
        for row, prompt in enumerate(call.prompts):
            if video_token is not None and bool((prompt == video_token).any()):
                raise ValueError(f"prompt {row} holds video tokens: videos are not supported (legrad explains one "
                                 "image per sequence)")
            got = int((prompt == self.image_token_id).sum())
            n_img = self._num_image_tokens(call, row)
            if got != n_img:
                raise ValueError(f"prompt {row} holds {got} image tokens; this model expects {n_img} (one image, as "
                                 "the processor expands it)")
        if any(m.training for m in self.model.modules()):
            raise ValueError("the VLM is in training mode (dropout would make the maps random); call model.eval()")
        return call, tokenize_answers(answers, tokenizer, self.text_config.vocab_size, self.image_token_id)

    def _check_pixels(self, call: VLMInputs) -> None:
        """``pixel_values`` has the tower's fixed input size."""
        size = self.visual.config.image_size
        c = self.visual.config.num_channels
        if tuple(call.pixel_values.shape[-3:]) != (c, size, size):
            raise ValueError(f"pixel_values must be [B, {c}, {size}, {size}] for this model, got "
                             f"{tuple(call.pixel_values.shape)}; use the model's processor")

    def _check_call(self, call: VLMInputs) -> None:
        """Family-specific checks of a call (before any work)."""

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        """Image placeholder tokens of prompt ``row`` (= image feature rows)."""
        gh, gw = self._grid()
        return gh * gw

    def _tile_rows(self, call: VLMInputs) -> list[list[int]]:
        """Rows of the tower's input batch (:meth:`_tower_pixels`) that belong to each image."""
        return [[b] for b in range(call.batch)]

    def _tower_pixels(self, call: VLMInputs) -> Any:
        """What the vision tower runs on (``[tiles, C, H, W]``)."""
        return call.pixel_values

    def _image_features(self, y: torch.Tensor, images: list[int], counts: list[int], call: VLMInputs) -> torch.Tensor:
        """Features ``[tokens, D]`` of a chunk's sequences, in order, from its tiles' block outputs ``y``."""
        feats = self._features(y)
        return feats.reshape(-1, feats.shape[-1])

    def _image_map(self, rel: torch.Tensor, b: int, call: VLMInputs) -> torch.Tensor:
        """Relevance of one (image, answer) on its image: ``[tiles, patches]`` -> ``[gh, gw]`` (raster order)."""
        return rel.reshape(self._grid())

    def _map_size(self, b: int, call: VLMInputs) -> tuple[int, int]:
        """``(H, W)`` of image ``b``'s maps when ``output_size`` is None."""
        return tuple(call.pixel_values.shape[-2:])

    def _safe_id(self) -> int:
        pad = getattr(self.text_config, "pad_token_id", None)
        return pad if isinstance(pad, int) and 0 <= pad < self.text_config.vocab_size else 0

    def _tokens_per_tile(self, call: VLMInputs) -> int:
        gh, gw = self._grid()
        return gh * gw + self.prefix_tokens

    def _chunk(self, n_items: int, call: VLMInputs, answers: list, chunk: int | None, max_memory: float | None,
               max_tokens: int | None) -> int:
        tiles = self._tile_rows(call)
        patches = max(len(t) for t in tiles) * (self._tokens_per_tile(call) - self.prefix_tokens)
        if max_tokens is not None and patches > max_tokens:
            raise ValueError(f"the image has {patches} patch tokens, more than max_tokens={max_tokens}")
        tc = self.text_config
        fixed, per_item = budget.answer_sequence_bytes(
            length=max(len(p) for p in call.prompts) + max(len(a) for a in answers),
            answer_length=max(len(a) for a in answers), lm_layers=tc.num_hidden_layers, lm_width=tc.hidden_size,
            lm_inner=getattr(tc, "intermediate_size", None) or 4 * tc.hidden_size, vocab=tc.vocab_size,
            lm_element_size=next(self.model.get_output_embeddings().parameters()).element_size(),
            tile_tokens=self._tokens_per_tile(call), tower_width=self.tower.width,
            tower_heads=self.tower.heads, tiles_per_sequence=max(len(t) for t in tiles),
            tiles_total=sum(len(t) for t in tiles))
        return budget.sequences_per_pass(n_items, fixed, per_item, self.device(), max_memory, chunk)

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

    def _explained(self, run: Run, start: int) -> Iterator[tuple[int, Any, torch.Tensor, tuple]]:
        """The runner over the feeding blocks: plain below ``start``, then per explained block its input ``x``
        (float32) and attention ``(h, q, k, v, o)``, before ``x`` moves on to the next block."""
        x = run.tokens
        for i in range(start):
            x = plain_block(run.blocks[i], x, run)
        x = x.float()  # the explained blocks run in float32
        for i in range(start, self.depth):
            block = run.blocks[i]
            h, q, k, v, o = attention(block, x, run)
            yield i, block, x, (h, q, k, v, o)
            x = after_attention(block, x, h, o)

    def _relevance(self, call: VLMInputs, answers: list[torch.Tensor], items: list, start: int,
                   chunk: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per item, ``[tiles, patches]`` relevance summed over the explained blocks, and the items' scores
        ``[n]`` at the last feeding block (the unchanged model's)."""
        device = self.device()
        pixels = self._tower_pixels(call)
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.detach().to(device=device, dtype=self.param_dtype())
            pixels = pixels.clone() if pixels.is_inference() else pixels
        run = self.declare(pixels, self.param_dtype())
        tiles = self._tile_rows(call)
        total: list[Any] = [0.0] * len(items)
        scores = torch.zeros(len(items), device=device)
        chunks = [items[i:i + chunk] for i in range(0, len(items), chunk)]
        packed = [pack(c, call, answers, self.image_token_id, self._safe_id()) for c in chunks]
        for layer, block, x, attn in self._explained(run, start):
            lo = 0
            for part, seqs in zip(chunks, packed):
                check_deadline()  # a caller's time limit (legrad.engine.deadline), between language-model runs
                images = [b for b, _, _ in part]
                rows = torch.tensor([r for b in images for r in tiles[b]], device=device)
                counts = [len(tiles[b]) for b in images]
                step = self._answer_step(layer, block, x, attn, run, rows, images, counts, seqs, call)
                rel = layer_relevance(step, None, prompt_chunk=1, scorer=_answer_scores)[:, 0]
                if layer == self.depth - 1:
                    scores[lo:lo + len(part)] = step.feature.detach()[:, 0]
                del step
                for i, piece in enumerate(rel.split(counts)):
                    total[lo + i] = total[lo + i] + piece
                lo += len(part)
        return total, scores

    def _answer_step(self, layer: int, block: Any, x: torch.Tensor, attn: tuple, run: Run, rows: torch.Tensor,
                     images: list[int], counts: list[int], seqs: Packed, call: VLMInputs) -> LayerStep:
        """The engine's step for one chunk at one block: the chunk's own copy of ``O`` as the leaf, and its
        sequences' scores ``[n, 1]`` (image features from the block's output, through the model's forward) as
        the feature."""
        h, q, k, v, o = attn
        leaf = o[rows].clone().requires_grad_(True)
        with torch.enable_grad():
            y = after_attention(block, x[rows], None if h is None else h[rows], leaf)
            feats = self._image_features(y, images, counts, call)
            score = self._sequence_scores(feats, seqs, call, images)[:, None]  # indexed in the graph
        if not bool(torch.isfinite(score).all()):
            raise NonFiniteError("the answers' log-probabilities are not finite (numeric overflow in the model)")
        mask = None if run.key_mask is None else run.key_mask[rows]
        return LayerStep(layer=layer, feature=score, out=leaf, value=v[rows], num_prefix_tokens=self.prefix_tokens,
                         key_mask=mask, query=q[rows], key=k[rows], scale=block.attn.scale, attn_bias=block.bias)

    def _sequence_scores(self, feats: torch.Tensor, seqs: Packed, call: VLMInputs, images: list[int]) -> torch.Tensor:
        """``[n]`` scores of a chunk's sequences given their image features ``[tokens, D]``: the model's own
        forward with ``mm_encoder_outputs`` (it places the features, builds masks and positions)."""
        device = self.device()
        ids = torch.where(seqs.image, self.image_token_id, seqs.ids).to(device)
        lm_dtype = self.model.get_input_embeddings().weight.dtype
        enc = {"image": self._encoder_outputs(feats.to(lm_dtype), call, images)}
        out = self.model.model(input_ids=ids, attention_mask=seqs.mask.to(device), mm_encoder_outputs=enc,
                               use_cache=False, **self._lm_kwargs(seqs, call, images, device))
        return self._answer_scores(out[0], seqs)

    def _answer_scores(self, hidden: torch.Tensor, seqs: Any) -> torch.Tensor:
        """``[n]`` summed log-probs of the counted answer tokens from the last hidden states ``[n, L, D]``."""
        cap = getattr(self.text_config, "final_logit_softcapping", None) if self.final_softcap else None
        return answer_logprobs(hidden, seqs, self.model.get_output_embeddings(), cap)

    def score(self, image: Any, answers: Any, tokenizer: Any = None, **inputs: Any) -> torch.Tensor:
        """The answers' summed log-probabilities ``[B, P]`` under the unchanged model (no maps), for checks.

        Raises:
            TypeError, ValueError: on invalid inputs.
        """
        call, ids = self._validate(image, inputs, answers, tokenizer)
        items = [(b, p, None) for b in range(call.batch) for p in range(len(ids))]
        with torch.inference_mode(False), torch.no_grad():
            images = [b for b, _, _ in items]
            feats = self._plain_features(call, images)
            seqs = pack(items, call, ids, self.image_token_id, self._safe_id())
            return self._sequence_scores(feats, seqs, call, images).reshape(call.batch, len(ids))
