"""Runs the ORIGINAL LeGrad package (legrad-torch 1.1, open_clip 2.23) as a test oracle, in a child process.

Never imported: ``tests/test_reference_parity.py`` runs it as a script with ``PYTHONPATH`` set to a side
folder that holds legrad-torch 1.1, open_clip 2.23 and einops (the original imports as ``legrad`` too, so
it cannot share a process with this library). It builds the open_clip 2.23 model of a config, loads the
image tower's weights saved by the test (``visual.state_dict()``, strict), wraps it with the original
``LeWrapper`` and writes its maps for the test's images and prompts to an ``.npz``.

The original explains one image per call for CLIP and CoCa (and sums the prompts of one call into one
map for CoCa and SigLIP), so this script calls it once per image and/or prompt, as the original's
contract allows, and stacks the results into ``[B, P, H, W]``.

Usage: ``python legrad_torch_run.py CONFIG WEIGHTS INPUTS OUT``, INPUTS an ``.npz`` with ``image``
``[B, 3, H, W]``, ``text`` ``[P, D]``, optional ``empty`` ``[D]`` (SigLIP's empty-prompt embedding) and
``layer_index``.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch


def main(config: str, weights: str, inputs: str, out: str) -> None:
    import open_clip

    import legrad

    side = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0]
    if not side or not os.path.abspath(legrad.__file__).startswith(os.path.abspath(side)):
        raise SystemExit(f"expected the original legrad from the side folder {side!r}, got {legrad.__file__}")
    data = np.load(inputs)
    image = torch.from_numpy(data["image"])
    text = torch.from_numpy(data["text"])
    layer_index = int(data["layer_index"])
    model = open_clip.create_model(config, pretrained=None).eval()
    model.visual.load_state_dict(torch.load(weights), strict=True)
    wrapper = legrad.LeWrapper(model, layer_index=layer_index)
    wrapper.eval()
    maps = []
    if wrapper.model_type == "clip":  # one image per call, all prompts at once
        for b in range(image.shape[0]):
            maps.append(wrapper.compute_legrad_clip(text, image[b : b + 1])[0])
        result = torch.stack(maps)
    elif wrapper.model_type == "coca":  # one image and one prompt per call
        for b in range(image.shape[0]):
            maps.append(torch.cat([wrapper.compute_legrad_coca(text[p : p + 1], image[b : b + 1])[0]
                                   for p in range(text.shape[0])]))
        result = torch.stack(maps)
    else:  # SigLIP: the whole batch per call, one prompt per call; the same empty prompt as legrad's
        correction = "empty" in data.files
        if correction:
            wrapper.empty_embedding = torch.from_numpy(data["empty"]).reshape(-1, 1)
        result = torch.cat([wrapper.compute_legrad_siglip(text[p : p + 1], image, apply_correction=correction)
                            for p in range(text.shape[0])], dim=1)
    np.savez(out, maps=result.detach().float().numpy(), origin=np.array(legrad.__file__),
             open_clip=np.array(open_clip.__file__))


if __name__ == "__main__":
    main(*sys.argv[1:5])
