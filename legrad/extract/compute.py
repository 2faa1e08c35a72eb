"""The model work of ``legrad extract``: prompt embeddings once, then heatmaps and similarities per batch."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.maps import min_max
from ..frontend.explainer import Explainer
from ..frontend.loop import explain_isolated
from ..io.errors import one_line
from .inputs import ImageTask
from .store import output_name, write_output

__all__ = ["FOLDER_ERRNOS", "PROMPT_CHUNK", "PromptTable", "explain_batch", "heatmaps"]

#: Write errors of the whole output folder rather than of one file (disk full, quota, read-only).
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

#: Prompts per text-encoder batch.
PROMPT_CHUNK = 256

#: ``finish(task, similarities or None, error or None)``: reports one image's outcome.
Finish = Callable[[ImageTask, "list[float] | None", "str | None"], None]


class PromptTable:
    """Normalised text embeddings, encoded once in fixed chunks of the sorted prompt list.

    Chunks are fixed by the global list so that a prompt's embedding is bit-identical on every rank;
    each rank encodes only the chunks holding prompts it needs.

    Args:
        explainer: encodes the prompts.
        all_prompts: every prompt of the job, on all ranks (duplicates allowed).
        needed: the prompts this rank explains.

    Attributes:
        table: ``[N, D]`` float32 embeddings (None if nothing is needed).
        row: prompt -> its row in ``table``.
    """

    def __init__(self, explainer: Explainer, all_prompts: list[str], needed: set[str]):
        order = sorted(set(all_prompts))
        chunks = sorted({i // PROMPT_CHUNK for i, p in enumerate(order) if p in needed})
        self.row: dict[str, int] = {}
        pieces = []
        for c in chunks:
            names = order[c * PROMPT_CHUNK:(c + 1) * PROMPT_CHUNK]
            with torch.inference_mode():
                pieces.append(explainer.encode_prompts(names).float())
            for name in names:
                self.row[name] = len(self.row)
        self.table = torch.cat(pieces).clone() if pieces else None  # clone: out of inference mode

    def rows(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[P]`` long: the rows of ``prompts`` in :attr:`table`."""
        return torch.tensor([self.row[p] for p in prompts], dtype=torch.long)


def heatmaps(wrapper: Any, image: torch.Tensor, text: torch.Tensor, start: int,
             map_hw: tuple[int, int]) -> torch.Tensor:
    """``[B, P, h, w]`` float32 maps in [0, 1] at ``map_hw``.

    At the patch grid they are ``compute_legrad(..., output_size='grid')``: upsampled bilinearly to the
    input size and min-max normalised again they are exactly ``compute_legrad``'s maps. Families whose
    images may differ in size (``adapter.variable_grids``: Siglip2 NaFlex) return each image's own size,
    resized here.
    """
    adapter = wrapper.adapter
    if adapter.variable_grids:
        maps = wrapper.compute_legrad(text, image=image, layer_index=start)
        if tuple(maps.shape[-2:]) != tuple(map_hw):
            maps = min_max(F.interpolate(maps, size=map_hw, mode="bilinear", antialias=True, align_corners=False))
        return maps.float()
    grid = adapter.grid_size(*image.shape[-2:])
    output_size = "grid" if tuple(map_hw) == tuple(grid) else tuple(map_hw)
    return wrapper.compute_legrad(text, image=image, layer_index=start, output_size=output_size)


def explain_batch(batch: dict[str, Any], todo: list[ImageTask], explainer: Explainer, model: Any,
                  model_dtype: torch.dtype, device: torch.device, prompts: PromptTable, start: int,
                  map_hw: tuple[int, int], dtype: np.dtype, out_dir: Path, config: dict, finish: Finish) -> int:
    """Explains one batch of decoded images, writes their outputs and reports each through ``finish``.

    Args:
        batch: a :func:`~legrad.extract.data.collate` batch with at least one decoded image.
        todo: the tasks ``batch["pos"]`` indexes.
        explainer, model: the loaded model (``model`` is ``explainer.wrapper.model``).
        model_dtype: dtype of the images fed to ``model.encode_image``.
        device: where the model runs.
        prompts: the encoded prompts.
        start: first explained block.
        map_hw: stored map size.
        dtype: stored map dtype.
        out_dir: output folder.
        config: the settings stored in each output.
        finish: called once per image of the batch.

    Returns:
        The number of images whose output was written.
    """
    items = [todo[p] for p in batch["pos"]]

    def compute(sel: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        # The whole batch, or one image of it when the batch failed (see explain_isolated).
        whole = sel == list(range(len(items)))
        heat, clip = (batch["heat"], batch["clip"]) if whole else (batch["heat"][sel], batch["clip"][sel])
        rows = [prompts.rows(items[b].prompts) for b in sel]
        table = prompts.table.to(device)
        if all(items[b].prompts == items[sel[0]].prompts for b in sel):
            text = table[rows[0].to(device)]  # [P, D], shared
        else:
            # Per-image prompt lists: pad each to the longest with its first prompt, drop the padding after.
            width = max(len(r) for r in rows)
            padded = torch.stack([torch.cat([r, r[:1].expand(width - len(r))]) for r in rows])
            text = table[padded.to(device)]  # [B, Pmax, D]
        with torch.no_grad():
            emb = model.encode_image(clip.to(device, model_dtype, non_blocking=True))
            emb = F.normalize(emb.float(), dim=-1)
        maps = heatmaps(explainer.wrapper, heat.to(device, non_blocking=True), text, start, map_hw).cpu().numpy()
        return [(maps[i], (table[r.to(device)] @ emb[i]).cpu().numpy().astype(np.float32))
                for i, r in enumerate(rows)]

    # e.g. out of memory, or an overflow of a degenerate image: one image's problem, not its batch's.
    outcomes = explain_isolated(list(range(len(items))), compute,
                                describe=lambda exc: "explaining failed: " + one_line(exc, 240))
    n_ok = 0
    for b, (t, (result, error)) in enumerate(zip(items, outcomes)):
        if result is None:
            finish(t, None, error)
            continue
        item_maps, sims = result
        p = len(t.prompts)
        arrays = {
            "maps": item_maps[:p].astype(dtype),
            "prompts": np.array(list(t.prompts), dtype=str),
            "similarity": sims,
            "image": np.array(t.image),
            "image_size": np.array(batch["sizes"][b], dtype=np.int32),
            "input_size": np.array(config["input_size"], dtype=np.int32),
            "config": np.array(json.dumps(config, sort_keys=True)),
            "source": np.array(json.dumps(batch["sources"][b], sort_keys=True)),
        }
        try:
            write_output(out_dir, output_name(t.key), arrays)
        except OSError as exc:
            if exc.errno in FOLDER_ERRNOS:
                # No later image could be written either: stop now, not after computing all of them.
                raise OSError(exc.errno, f"could not write {output_name(t.key)} into {out_dir} "
                              f"({exc.strerror}); free space or fix the folder, then rerun to resume") from None
            finish(t, None, f"could not write {output_name(t.key)}: {exc}")
            continue
        finish(t, sims.tolist(), None)
        n_ok += 1
    return n_ok
