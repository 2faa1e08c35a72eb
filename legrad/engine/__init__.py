"""The LeGrad method, independent of any model family: :mod:`~legrad.engine.step` (what a layer hands
over, the scorers), :mod:`~legrad.engine.targets` (what a map explains: the readout spaces and the targets
scored in them), :mod:`~legrad.engine.validation`, :mod:`~legrad.engine.budget` (memory),
:mod:`~legrad.engine.relevance` (per-layer relevance), :mod:`~legrad.engine.correction` (empty prompt),
:mod:`~legrad.engine.maps` (grids, upsampling, normalisation) and :mod:`~legrad.engine.pipeline`, which
runs them in order. The engine imports torch and :mod:`legrad.ops` only."""
