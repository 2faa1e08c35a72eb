"""transformers ``Idefics3ForConditionalGeneration`` (Idefics3) and ``SmolVLMForConditionalGeneration`` (SmolVLM,
SmolVLM2): SigLIP-style vision tower (no class token; NaViT-style position embeddings, here of whole tiles),
image features = the model's ``connector`` on ``post_layernorm`` of a block's output: the pixel shuffle
(``scale_factor`` x ``scale_factor`` patches into one token) and the linear modality projection. Every block
feeds the features; the default explains the last two. Maps live on the tower's patch grid in raster order (the
tower itself is raster; the pixel shuffle only groups patches for the projection).

Image splitting (the processors' default, ``do_image_splitting=True``): ``pixel_values`` ``[B, tiles, C, S, S]``
holds each image's ``rows x cols`` sub-images (the image resized to multiples of ``S``, cut in raster order) and
then the whole image squared to ``S x S`` (the global tile); all-zero tiles are batch padding, dropped as the
model drops them. The tiles' grid is carried only by the prompt's ``<row_i_col_j>`` tokens, so it is read from
the prompt with the wrapper's tokenizer (the processor): without one, a split image is refused. Each tile has its
own attention in each explained block; the sub-images' relevance is laid out in their grid and the global tile's
map is resized bilinearly onto it and added (as for LLaVA-NeXT). Maps come at the size the processor resized the
image to (``rows * S x cols * S``; ``S x S`` without splitting). Several images or video in one sequence are
refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ...ops.functional import layer_norm, linear
from .base import VLMAdapter
from .inputs import Packed, VLMInputs

__all__ = ["Idefics3Adapter", "SmolVLMAdapter"]

_GRID_KEY = "_legrad_tile_grid"  # each prompt's (rows, cols) of sub-images, read from its tokens by _validate
_MAX_SPLITS = 6  # the processors' <row_i_col_j> tokens go up to 6 x 6


class Idefics3Adapter(VLMAdapter):
    """transformers ``Idefics3ForConditionalGeneration`` (one image per sequence, split into tiles or not)."""

    family = "transformers Idefics3ForConditionalGeneration (Idefics3 SigLIP tower, answers explained)"
    model_class = "Idefics3ForConditionalGeneration"
    tower_kind = "Idefics3 SigLIP"
    input_keys = ("pixel_attention_mask", _GRID_KEY)
    pixel_ndim = 5

    @staticmethod
    def _vision_module(model: Any) -> Any:
        return model.model.vision_model

    def _check(self) -> None:
        conn = getattr(self.model.model, "connector", None)
        if conn is None or not hasattr(conn, "pixel_shuffle") or not hasattr(conn.modality_projection, "proj"):
            raise TypeError(f"this {self.model_class}'s connector is not the pixel shuffle + linear one legrad "
                            "supports")
        gh, gw = self._grid()
        s = int(conn.scale_factor)
        if gh % s or gw % s:
            raise ValueError(f"the {gh} x {gw} patch grid is not a multiple of scale_factor={s}")

    def _feeding_blocks(self) -> int:
        return len(self.visual.encoder.layers)

    # ------------------------------------------------------------------ tiles
    def _validate(self, image: Any, inputs: dict[str, Any], answers: Any, tokenizer: Any) -> tuple[VLMInputs, list]:
        merged = {**dict(image), **inputs} if hasattr(image, "keys") else dict(inputs)
        ids = merged.get("input_ids")
        grids = self._read_grids(ids.detach().cpu(), tokenizer) if isinstance(ids, torch.Tensor) and ids.ndim == 2 \
            else None
        return super()._validate(image, {**inputs, _GRID_KEY: grids}, answers, tokenizer)

    @staticmethod
    def _read_grids(ids: torch.Tensor, tokenizer: Any) -> list[tuple[int, int]]:
        """Each prompt's ``(rows, cols)`` of sub-images from its ``<row_i_col_j>`` tokens (``(0, 0)``: not split)."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        marks: dict[int, tuple[int, int]] = {}
        if tok is not None and hasattr(tok, "convert_tokens_to_ids"):
            unk = getattr(tok, "unk_token_id", None)
            for i in range(1, _MAX_SPLITS + 1):
                for j in range(1, _MAX_SPLITS + 1):
                    t = tok.convert_tokens_to_ids(f"<row_{i}_col_{j}>")
                    if isinstance(t, int) and t != unk:
                        marks[t] = (i, j)
        grids = []
        for row in ids.tolist():
            found = [marks[t] for t in row if t in marks]
            grids.append((max(i for i, _ in found), max(j for _, j in found)) if found else (0, 0))
        return grids

    def _tiles(self, call: VLMInputs) -> list[int]:
        """Real tiles of each image (all-zero tiles are the batch's padding, which the model drops)."""
        return [int(r.sum()) for r in call.pixel_values.flatten(2).ne(0).any(-1)]

    def _grid_of(self, call: VLMInputs, b: int) -> tuple[int, int]:
        rows, cols = call.extra[_GRID_KEY][b]
        return int(rows), int(cols)

    def _num_image_tokens(self, call: VLMInputs, row: int) -> int:
        gh, gw = self._grid()
        return self._tiles(call)[row] * gh * gw // int(self.model.model.connector.scale_factor) ** 2

    def _check_pixels(self, call: VLMInputs) -> None:
        super()._check_pixels(call)
        real = call.pixel_values.flatten(2).ne(0).any(-1)  # [B, tiles]
        mask = call.extra.get("pixel_attention_mask")
        for b, n in enumerate(self._tiles(call)):
            if n == 0 or not bool(real[b, :n].all()):
                raise ValueError(f"pixel_values of image {b} has an all-zero tile before a real one (the model drops "
                                 "all-zero tiles as padding); pass the processor output unchanged")
            rows, cols = self._grid_of(call, b)
            if n != (1 if rows == 0 else rows * cols + 1):
                hint = ("its prompt holds no <row_i_col_j> token the wrapper's tokenizer knows: pass the processor as "
                        "tokenizer (LeWrapper(model, tokenizer=processor)) or call the processor with "
                        "do_image_splitting=False" if rows == 0 else
                        f"its prompt's <row_i_col_j> tokens give {rows} x {cols} sub-images + 1 global tile")
                raise ValueError(f"pixel_values holds {n} tiles for image {b}; {hint} (several images or video in "
                                 "one sequence are not supported)")
            if mask is not None and not bool(torch.as_tensor(mask)[b, :n].bool().all()):
                raise ValueError("pixel_attention_mask marks padded pixels inside an image: legrad explains whole "
                                 "tiles only; pass the processor output unchanged")

    def _tile_rows(self, call: VLMInputs) -> list[list[int]]:
        out, lo = [], 0
        for n in self._tiles(call):
            out.append(list(range(lo, lo + n)))
            lo += n
        return out

    def _tower_pixels(self, call: VLMInputs) -> torch.Tensor:
        return torch.cat([call.pixel_values[b, :n] for b, n in enumerate(self._tiles(call))])

    def _image_map(self, rel: torch.Tensor, b: int, call: VLMInputs) -> torch.Tensor:
        gh, gw = self._grid()
        base = rel[-1].reshape(gh, gw)  # the global tile (the only one without splitting)
        rows, cols = self._grid_of(call, b)
        if rows == 0:
            return base
        grid = rel[:-1].reshape(rows, cols, gh, gw).permute(0, 2, 1, 3).reshape(rows * gh, cols * gw)
        return grid + F.interpolate(base[None, None], size=tuple(grid.shape), mode="bilinear",
                                    align_corners=False)[0, 0]

    def _map_size(self, b: int, call: VLMInputs) -> tuple[int, int]:
        rows, cols = self._grid_of(call, b)
        s = int(self.visual.config.image_size)
        return (s, s) if rows == 0 else (rows * s, cols * s)

    # ------------------------------------------------------------------ drift guard
    def probe_input(self) -> dict:
        size = self.visual.config.image_size
        noise = torch.randn(1, 1, self.visual.config.num_channels, size, size, generator=torch.Generator().manual_seed(0))
        return {"pixel_values": noise.to(self.device(), self.param_dtype())}

    def _probe_call(self, image: dict[str, Any]) -> VLMInputs:
        return VLMInputs(image["pixel_values"], [torch.zeros(1, dtype=torch.long)], None, None, {_GRID_KEY: [(0, 0)]})

    # ------------------------------------------------------------------ features and scores
    def _features(self, y: torch.Tensor) -> torch.Tensor:
        """The model's connector on ``post_layernorm(y)``: ``[n, N, C]`` -> ``[n, N / s^2, D]``."""
        conn = self.model.model.connector
        z = conn.pixel_shuffle(layer_norm(self.visual.post_layernorm, y), conn.scale_factor)  # the model's own reshape
        return linear(conn.modality_projection.proj, z)

    def _lm_kwargs(self, seqs: Packed, call: VLMInputs, images: list[int], device: torch.device) -> dict[str, Any]:
        return {}  # a causal language model: no token types


class SmolVLMAdapter(Idefics3Adapter):
    """transformers ``SmolVLMForConditionalGeneration`` (SmolVLM, SmolVLM2; images)."""

    family = "transformers SmolVLMForConditionalGeneration (Idefics3 SigLIP tower, answers explained)"
    model_class = "SmolVLMForConditionalGeneration"
