"""Shared fixtures and settings; helpers (tiny models, oracles) live in the ``helpers`` package."""

from __future__ import annotations

import logging
import os

import pytest
import torch

# open_clip logs a warning for every random-init model; keep test output readable.
logging.getLogger().setLevel(logging.ERROR)
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _one_thread_is_enough():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slower than ~5 s (full-size models); deselect with -m 'not slow'")
