"""Localization benchmark: LeGrad vs raw attention, rollout, GradCAM and CheferCAM.

Same program as ``legrad bench`` (see ``legrad/eval/`` for the metrics and the dataset format):

    python bench/localization.py                        # bundled demo model, fresh synthetic scenes
    python bench/localization.py --limit 20 --no-perturbation
    python bench/localization.py --data my_dataset --model ViT-B-16 --pretrained laion2b_s34b_b88k

Prints a Markdown method x metric table and writes JSON (``--json``, default
outputs/bench_localization.json).
"""

from __future__ import annotations

import sys

from legrad.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
