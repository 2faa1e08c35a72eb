"""``bench/bench_torchcam.py`` runs end to end on a shrunk torchvision ViT, and its check that legrad and
torchcam 0.5's ``LeGrad`` compute the same maps (so that the timings compare equal work) passes."""

from __future__ import annotations

import json
import subprocess

import pytest
from helpers.frontend_utils import PYTHON, REPO, subprocess_env

pytest.importorskip("torchcam")


@pytest.mark.subprocess
def test_bench_torchcam_small_runs_and_the_maps_agree(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([PYTHON, str(REPO / "bench" / "bench_torchcam.py"), "--small", "--repeats", "1",
                          "--classes", "1", "3", "--json", str(out)], capture_output=True, text=True, timeout=600,
                         env=subprocess_env(), cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "same maps" in res.stdout
    report = json.loads(out.read_text())
    assert report["check"]["maps_equal"] and report["check"]["shape"] == [1, 3, 4, 4]
    assert max(report["check"]["max_abs_diff"].values()) <= 1e-4
    assert [r["P"] for r in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert all(row[k] > 0 for k in ("forward_s", "legrad_s", "torchcam_s", "torchcam_1fwd_s",
                                         "torchcam_per_legrad"))
