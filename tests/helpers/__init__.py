"""Test helpers: tiny models (:mod:`.models`, :mod:`.tiny_towers`), independent oracles (:mod:`.oracles`,
:mod:`.classifier_oracles`) and front-end utilities (:mod:`.frontend_utils`)."""
