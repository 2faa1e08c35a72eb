"""Model families: one adapter per image-tower family, behind one protocol (:mod:`~legrad.adapters.base`)
and one registry (:mod:`~legrad.adapters.registry`). Families: :mod:`~legrad.adapters.openclip`,
:mod:`~legrad.adapters.timm` (on :mod:`~legrad.adapters.timm_blocks`), :mod:`~legrad.adapters.hf`
(transformers) and :mod:`~legrad.adapters.classifiers`. Nothing is imported here, so that importing
one family does not import the others."""
