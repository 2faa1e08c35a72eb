"""transformers ``Qwen2VLForConditionalGeneration`` (Qwen2-VL): Qwen ViT tower (2-D rotary positions, no class
token), image features = the model's own ``merger`` (``ln_q``, then an MLP over each 2 x 2 merge window of the
last block's output). Every block feeds the features; the default explains the last two.

The processor lays each image's patches out in merge-window order (for each window of ``m x m`` patches, in
raster order of the windows, its patches in raster order); maps are put back in raster order on the patch grid
``image_grid_thw[1:]``. The language model's own forward places the features and builds its M-RoPE positions
from ``input_ids`` and ``image_grid_thw``.

``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL) is the same family on the Qwen2.5 ViT tower (RMSNorms, gated
MLPs, window attention outside ``fullatt_block_indexes``; see :class:`~legrad.adapters.vlm.towers.Qwen25ViTTower`)
with an RMSNorm in its merger. The model runs its tower in window order and puts the merged features back in the
processor's order; legrad never leaves the processor's order (windows as an attention mask), so the features and the
maps need no permutation of their own.

``Qwen3_5ForConditionalGeneration`` (Qwen3.5) runs the Qwen3 ViT tower (a learned position table resampled to the
grid, LayerNorms, attention over the whole image) and its merger (``norm``, ``linear_fc1``, GELU, ``linear_fc2`` over
each merge window). ``Qwen3VLForConditionalGeneration`` (Qwen3-VL) shares that tower but also feeds the language
model DeepStack features (intermediate blocks' outputs, through their own mergers, added to the first decoder layers'
hidden states): the score of explained block b takes the model with its tower cut after block b, every feeding point
at or after b (the merger, the DeepStack taps) reading block b's output (see :class:`Qwen3VLAdapter`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from ...ops.functional import apply_module
from ..runner import Run, after_attention, attention, plain_block
from .base import VLMAdapter
from .inputs import Packed, VLMInputs

__all__ = ["Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3_5Adapter", "Qwen3VLAdapter"]


class Qwen2VLAdapter(VLMAdapter):
    """transformers ``Qwen2VLForConditionalGeneration`` (images; one image per sequence)."""

    family = "transformers Qwen2VLForConditionalGeneration (Qwen ViT tower, answers explained)"
    model_class = "Qwen2VLForConditionalGeneration"
    tower_kind = "Qwen ViT"
    input_keys = ("image_grid_thw",)  # mm_token_type_ids is rebuilt for each prompt + answer sequence
    pixel_ndim = 2

    @staticmethod
    def _vision_module(model: Any) -> Any:
        return model.model.visual

    def _check(self) -> None:
        merger = getattr(self.visual, "merger", None)
        if merger is None or not hasattr(merger, "ln_q") or not hasattr(merger, "mlp"):
            raise TypeError("this Qwen2-VL's merger is not the ln_q + mlp one legrad supports")

    def _feeding_blocks(self) -> int:
        return len(self.visual.blocks)

    @property
    def patch_size(self) -> tuple[int, int]:
        p = int(self.visual.config.patch_size)
        return p, p

    @property
    def native_size(self) -> tuple[int, int]:
        side = 2 * self.tower.merge * self.patch_size[0]  # a small probe: 2 x 2 merge windows
        return side, side

    def probe_input(self) -> dict:
        cfg = self.visual.config
        h, w = self.native_size
        grid = torch.tensor([[1, h // cfg.patch_size, w // cfg.patch_size]], device=self.device())
        dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        noise = torch.randn(int(grid.prod()), dim, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": noise.to(self.device(), self.param_dtype()), "image_grid_thw": grid}

    def _probe_call(self, image: dict[str, Any]) -> VLMInputs:
        return VLMInputs(image["pixel_values"], [torch.zeros(1, dtype=torch.long)], None, None,
                         {"image_grid_thw": image["image_grid_thw"]})

    # ------------------------------------------------------------------ the call
    def _grid_thw(self, call: VLMInputs) -> torch.Tensor:
        return call.extra["image_grid_thw"]

    def _check_pixels(self, call: VLMInputs) -> None:
        grid = call.extra.get("image_grid_thw")
        if grid is None:
            raise ValueError("Qwen2-VL needs image_grid_thw: pass the processor output unchanged")
        if not isinstance(grid, torch.Tensor) or grid.ndim != 2 or grid.shape[1] != 3 or grid.is_floating_point():
            raise ValueError(f"image_grid_thw must be an integer [images, 3] tensor, got {getattr(grid, 'shape', grid)}")
        if grid.shape[0] != call.batch:
            raise ValueError(f"image_grid_thw holds {grid.shape[0]} images for {call.batch} prompts; legrad explains one "
                             "image per sequence (several images or video in one sequence are not supported)")
        if bool((grid[:, 0] != 1).any()):
            raise ValueError("image_grid_thw has a temporal size other than 1: videos are not supported")
        if bool((grid != grid[:1]).any()):
            raise ValueError("the images of one call must share one patch grid (image_grid_thw); call once per size")
        m = self.tower.merge
        if bool((grid[:, 1:] % m != 0).any()):
            raise ValueError(f"image_grid_thw must be multiples of the merge size {m}, got {grid.tolist()}")
        cfg = self.visual.config
        dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        want = (int(grid.prod(-1).sum()), dim)
        if tuple(call.pixel_values.shape) != want:
            raise ValueError(f"pixel_values must be {list(want)} for image_grid_thw {grid.tolist()}, got "
                             f"{tuple(call.pixel_values.shape)}; use the model's processor")

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        return int(self._grid_thw(call)[row].prod()) // self.tower.merge ** 2

    def _tower_pixels(self, call: VLMInputs) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device()
        values = call.pixel_values.detach().to(device=device, dtype=self.param_dtype())
        return values.clone() if values.is_inference() else values, self._grid_thw(call).to(device)

    def _grid_hw(self, call: VLMInputs) -> tuple[int, int]:
        _, h, w = (int(v) for v in self._grid_thw(call)[0])
        return h, w

    def _tokens_per_tile(self, call: VLMInputs) -> int:
        h, w = self._grid_hw(call)
        return h * w

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        merger = self.visual.merger
        z = self.tower.norm(merger.ln_q)(y)
        z = z.reshape(-1, z.shape[-1] * self.tower.merge ** 2)  # each merge window's tokens are consecutive
        return apply_module(merger.mlp, z)

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        # The model's own M-RoPE positions (get_rope_index, from mm_token_type_ids as the processor makes them:
        # 1 for image tokens), passed in: left to compute them, the forward would cache rope_deltas on the model.
        grid = self._grid_thw(call)[images].to(device)
        ids = torch.where(seqs.image, self.image_token_id, seqs.ids).to(device)
        types = seqs.image.long().to(device)
        positions, _ = self.model.model.get_rope_index(ids, image_grid_thw=grid, attention_mask=seqs.mask.to(device),
                                                      mm_token_type_ids=types)
        return {"image_grid_thw": grid, "mm_token_type_ids": types, "position_ids": positions}

    def _image_map(self, rel: torch.Tensor, b: int, call: VLMInputs) -> torch.Tensor:
        h, w, m = *self._grid_hw(call), self.tower.merge
        # Merge-window order (h/m, w/m, m, m) back to raster order (h, w).
        return rel.reshape(h // m, w // m, m, m).permute(0, 2, 1, 3).reshape(h, w)

    def _map_size(self, b: int, call: VLMInputs) -> tuple[int, int]:
        h, w = self._grid_hw(call)
        return h * self.patch_size[0], w * self.patch_size[1]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """transformers ``Qwen2_5_VLForConditionalGeneration`` (images; one image per sequence)."""

    family = "transformers Qwen2_5_VLForConditionalGeneration (Qwen2.5 ViT tower, answers explained)"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    tower_kind = "Qwen2.5 ViT"

    def _check(self) -> None:
        ln = getattr(getattr(self.visual, "merger", None), "ln_q", None)
        if ln is None or not hasattr(ln, "variance_epsilon") or not hasattr(self.visual.merger, "mlp"):
            raise TypeError("this Qwen2.5-VL's merger is not the RMSNorm ln_q + mlp one legrad supports")

    @property
    def native_size(self) -> tuple[int, int]:
        # A probe one merge window wider and taller than an attention window: windows of unequal sizes, so the drift
        # guard compares the windowed blocks too.
        side = (self.tower.window + 1) * self.tower.merge * self.patch_size[0]
        return side, side


class Qwen3_5Adapter(Qwen2VLAdapter):
    """transformers ``Qwen3_5ForConditionalGeneration`` (images; one image per sequence)."""

    family = "transformers Qwen3_5ForConditionalGeneration (Qwen3 ViT tower, answers explained)"
    model_class = "Qwen3_5ForConditionalGeneration"
    tower_kind = "Qwen3 ViT"

    def _check(self) -> None:
        merger = getattr(self.visual, "merger", None)
        if merger is None or not all(hasattr(merger, a) for a in ("norm", "linear_fc1", "act_fn", "linear_fc2")):
            raise TypeError("this Qwen3.5's merger is not the norm + linear_fc1/linear_fc2 one legrad supports")
        if hasattr(self.visual, "deepstack_merger_list"):
            raise TypeError("this Qwen3.5's vision tower has DeepStack mergers, unlike transformers' Qwen3.5 (whose "
                            "forward would not use them); legrad explains DeepStack only for Qwen3-VL")

    def _features(self, y: torch.Tensor) -> torch.Tensor:
        return self._merge(self.visual.merger, y)

    def _merge(self, merger: Any, y: torch.Tensor) -> torch.Tensor:
        """A Qwen3 ``PatchMerger`` (the model's, or a DeepStack one) on block output ``y`` ``[n, N, C]``:
        ``[n, N / merge**2, D]``."""
        wide = y.shape[-1] * self.tower.merge ** 2
        if merger.use_postshuffle_norm:  # the norm over each merge window's concatenated tokens
            z = self.tower.norm(merger.norm)(y.reshape(-1, wide))
        else:
            z = self.tower.norm(merger.norm)(y).reshape(-1, wide)  # each merge window's tokens are consecutive
        z = z.reshape(*y.shape[:-2], -1, wide)
        return apply_module(merger.linear_fc2, apply_module(merger.act_fn, apply_module(merger.linear_fc1, z)))


class Qwen3VLAdapter(Qwen3_5Adapter):
    """transformers ``Qwen3VLForConditionalGeneration`` (images; one image per sequence), DeepStack included.

    Besides the merger's features of the last block, the model adds DeepStack features to the first decoder layers'
    hidden states at the image positions: ``deepstack_merger_list[j]`` of block ``deepstack_visual_indexes[j]``'s output.
    The score of explained block ``b`` is the model's with the tower cut after block ``b`` (the blocks after it
    skipped): the merger and every DeepStack tap at or after ``b`` read block ``b``'s output, the taps before ``b`` their
    own (unchanged) blocks' outputs. So a block feeds the language model at several points (the merger and its taps),
    and at the last block this is the model's own feature set (its own scores).

    Features are carried as ``[tokens, D * (1 + taps)]`` (the merger's, then each tap's) and split into the model's
    ``pooler_output`` and ``deepstack_features`` for its forward.
    """

    family = "transformers Qwen3VLForConditionalGeneration (Qwen3 ViT tower with DeepStack, answers explained)"
    model_class = "Qwen3VLForConditionalGeneration"

    def _check(self) -> None:
        v = self.visual
        mergers = [v.merger, *getattr(v, "deepstack_merger_list", [])]
        if not all(all(hasattr(m, a) for a in ("norm", "linear_fc1", "act_fn", "linear_fc2")) for m in mergers):
            raise TypeError("this Qwen3-VL's mergers are not the norm + linear_fc1/linear_fc2 ones legrad supports")
        taps = self._taps
        if len(taps) != len(getattr(v, "deepstack_merger_list", [])) or not all(0 <= d < len(v.blocks) for d in taps):
            raise TypeError(f"this Qwen3-VL's deepstack_visual_indexes {taps} do not match its DeepStack mergers/blocks")
        # Per-call scratch: (explained block, {tap block: its output}) for the feature path of the current step.
        # Thread-local, so that calls from several threads on one wrapper never see each other's blocks.
        self._scratch = threading.local()

    @property
    def _taps(self) -> list[int]:
        """The blocks whose outputs feed DeepStack, in the order of their mergers."""
        return [int(d) for d in self.visual.deepstack_visual_indexes]

    def _explained(self, run: Run, start: int) -> Iterator[tuple[int, Any, torch.Tensor, tuple]]:
        # The base runner, also keeping the DeepStack blocks' outputs for the later explained blocks' features.
        outputs: dict[int, torch.Tensor] = {}
        x = run.tokens
        for i in range(start):
            x = plain_block(run.blocks[i], x, run)
            if i in self._taps:
                outputs[i] = x
        x = x.float()  # the explained blocks run in float32
        for i in range(start, self.depth):
            block = run.blocks[i]
            h, q, k, v, o = attention(block, x, run)
            self._scratch.context = (i, outputs)
            yield i, block, x, (h, q, k, v, o)
            x = after_attention(block, x, h, o)
            if i in self._taps:
                outputs[i] = x

    def _plain_features(self, call: VLMInputs, images: list[int]) -> torch.Tensor:
        device = self.device()
        run = self.declare(self._tower_pixels(call), self.param_dtype())
        outputs: dict[int, torch.Tensor] = {}
        x = run.tokens
        for i, block in enumerate(run.blocks[: self.depth]):
            x = plain_block(block, x, run)
            outputs[i] = x
        self._scratch.context = (self.depth - 1, {d: outputs[d] for d in self._taps})
        rows = torch.tensor(images, device=device)  # one tile (row) per image
        return self._image_features(x[rows], images, [1] * len(images), call)

    def _image_features(self, y: torch.Tensor, images: list[int], counts: list[int], call: VLMInputs) -> torch.Tensor:
        layer, outputs = getattr(self._scratch, "context", (self.depth - 1, {}))
        rows = torch.tensor(images, device=y.device)
        parts = [self._merge(self.visual.merger, y)]
        for d, merger in zip(self._taps, self.visual.deepstack_merger_list):
            parts.append(self._merge(merger, y if d >= layer else outputs[d][rows].to(y.dtype)))
        feats = torch.cat(parts, -1)
        return feats.reshape(-1, feats.shape[-1])

    def _encoder_outputs(self, feats: torch.Tensor, call: VLMInputs, images: list[int]) -> Any:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        main, *deep = feats.chunk(1 + len(self._taps), dim=-1)
        return BaseModelOutputWithDeepstackFeatures(pooler_output=(main,), deepstack_features=[(d,) for d in deep])

    def own_output(self, model: Any, image: Any) -> torch.Tensor:
        """The model's own ``get_image_features`` on the probe: its merger's features, then each DeepStack tap's,
        ``[tokens, D * (1 + taps)]`` (the drift guard compares the DeepStack features too)."""
        out = model.get_image_features(**image)
        parts = [torch.cat(out.pooler_output)] + [torch.cat(f) for f in out.deepstack_features]
        return torch.cat(parts, -1)
