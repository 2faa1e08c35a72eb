"""Alias of :mod:`legrad.eval.benchmark` (and of the ``legrad bench`` command line, :mod:`legrad.cli.bench`),
kept for compatibility.
"""

import sys

from legrad.cli.bench import add_parser, main, run
from legrad.eval.benchmark import MethodResult, evaluate, format_table
from legrad.eval.datasets import DEFAULT_SEED, FolderDataset, Sample, ToyScenes, preprocess_mask

__all__ = ["DEFAULT_SEED", "FolderDataset", "MethodResult", "Sample", "ToyScenes", "add_parser", "evaluate",
           "format_table", "main", "preprocess_mask", "run"]

if __name__ == "__main__":
    sys.exit(main())
