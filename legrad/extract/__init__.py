"""Dataset-scale LeGrad extraction: one ``.npz`` of heatmaps per image, resumable, on ``torch.distributed``.

:func:`run` walks a folder (or reads a JSONL manifest), explains every image against its prompts and writes

* ``OUT/<image path>.npz`` per image (see :func:`load_output` for the keys), written atomically, and
* ``OUT/manifest.jsonl``: one line per image, in input order, with the output file, the prompts, the
  image-text cosine similarities, ``status`` (``"ok"`` or ``"error"``) and the error message.

Rerunning the same command skips every image whose ``.npz`` exists and validates (readable, same prompts,
same settings, right shapes, same source file: size and mtime, else content hash), so an interrupted run
continues where it stopped and a changed image is explained again. One run at a time holds an output folder
(lock ``OUT/.legrad.lock``), and ``OUT/legrad-extract.json`` records the configuration of its results
(weights identified by their SHA-256): another configuration is refused unless ``overwrite=True``. Launched by ``torchrun``
(``WORLD_SIZE`` > 1 in the environment), each rank takes the images ``rank::world_size`` of the input
list, uses ``cuda:LOCAL_RANK`` when CUDA is available (NCCL) or the CPU (gloo), writes its own manifest
shard, and rank 0 merges the shards after a barrier. Per-image results do not depend on the number of
processes (up to floating-point batching noise).

Modules: :mod:`~legrad.extract.inputs` (folder, JSONL manifest, prompts file), :mod:`~legrad.extract.store`
(the ``.npz`` layout, its validation, manifest records), :mod:`~legrad.extract.runconfig` (the run
configuration), :mod:`~legrad.extract.data` (DataLoader decoding), :mod:`~legrad.extract.distributed` (the
process group), :mod:`~legrad.extract.compute` (prompt table, heatmaps per batch) and
:mod:`~legrad.extract.runner` (the run loop and the manifest merge). The folder lock and writability check
(:mod:`legrad.io.outdir`, shared with ``legrad explain``) and the folder walk, per-image isolation and
progress bar (:mod:`legrad.frontend.loop`, shared with ``legrad explain``) are in the layers below.
"""

from ..io.outdir import FolderBusyError, OutputFolderError
from .data import default_workers
from .inputs import ImageTask, discover
from .runner import ExtractResult, run
from .store import FORMAT_VERSION, MANIFEST_NAME, check_map_size, load_output, output_name

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "ExtractResult", "FolderBusyError", "ImageTask", "OutputFolderError",
           "check_map_size", "default_workers", "discover", "load_output", "output_name", "run"]
