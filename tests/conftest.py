"""Shared fixtures and settings; helpers (tiny models, oracles) live in the ``helpers`` package.

The markers are declared in pyproject.toml. A test of one of the heavy kinds (``subprocess``,
``torchrun``, ``browser``, ``notebook``) is also ``slow``, so ``pytest -m "not slow"`` is the fast core.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

# open_clip logs a warning for every random-init model; keep test output readable.
logging.getLogger().setLevel(logging.ERROR)
os.environ.setdefault("MPLBACKEND", "Agg")

HEAVY_KINDS = ("subprocess", "torchrun", "browser", "notebook")


@pytest.fixture(autouse=True)
def _one_thread_is_enough():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    # One marker to deselect for the fast core: the heavy kinds are slow by nature.
    for item in items:
        if any(item.get_closest_marker(kind) for kind in HEAVY_KINDS) and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


# Parity with the original package needs it installed in a side folder: .ci/run's legrad-torch step builds
# one and runs that file with LEGRAD_TORCH_1_1 set (docs/development.md); elsewhere it is not collected.
collect_ignore = [] if os.environ.get("LEGRAD_TORCH_1_1") else ["test_reference_parity.py"]
