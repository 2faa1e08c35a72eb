"""Stateless building blocks the adapters re-run towers with: attention (:mod:`~legrad.ops.attention`),
sub-module application from detached weights (:mod:`~legrad.ops.functional`) and positional-embedding
resampling (:mod:`~legrad.ops.posembed`). They import torch only."""
