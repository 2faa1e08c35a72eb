"""``list_pretrained``: exactly the (model, pretrained) pairs of open_clip whose image tower LeGrad supports."""

from __future__ import annotations

import open_clip
import pytest

from legrad import list_pretrained
from legrad.pretrained import supports_model_config


def test_pairs_are_open_clips_in_order_without_duplicates():
    pairs = list_pretrained()
    theirs = open_clip.list_pretrained()
    assert len(set(pairs)) == len(pairs)
    assert all(p in theirs for p in pairs)
    order = [theirs.index(p) for p in pairs]
    assert order == sorted(order)
    assert list_pretrained() == pairs  # cached, stable


@pytest.mark.skipif(open_clip.__version__ != "3.3.0", reason="counts are those of open_clip 3.3.0")
def test_counts_open_clip_3_3():
    assert len(list_pretrained()) == 162
    assert sum(supports_model_config(n) for n in open_clip.list_models()) == 116


def test_every_tag_of_every_supported_config():
    """All tags of the configs whose tower is supported, nothing else. (That ``supports_model_config``
    agrees with what LeWrapper does with the built model is checked for every config by
    ``test_adapters_openclip_timm.py::test_every_config``.)"""
    expected = [p for p in open_clip.list_pretrained() if supports_model_config(p[0])]
    assert list_pretrained() == list(dict.fromkeys(expected))


def test_table_and_unknown_names():
    table = list_pretrained(as_table=True)
    lines = table.splitlines()
    assert lines[0] == "| model | pretrained |" and len(lines) == 2 + len(list_pretrained())
    assert not supports_model_config("no-such-model")
