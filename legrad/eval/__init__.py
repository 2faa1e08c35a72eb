"""Evaluation of heatmaps against masks.

:mod:`~legrad.eval.metrics` (pointing game, mIoU, pixel accuracy, perturbation curves),
:mod:`~legrad.eval.datasets` (benchmark samples: synthetic scenes or a user folder) and
:mod:`~legrad.eval.benchmark` (every method x every metric). The methods themselves are in
:mod:`legrad.eval.baselines`; the command line is ``legrad bench`` (:mod:`legrad.cli.bench`).
Nothing is imported here, so that ``import legrad.eval.datasets`` stays light.
"""
