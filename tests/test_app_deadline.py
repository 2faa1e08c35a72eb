"""The cooperative per-request deadline (legrad.engine.deadline): its rules, the engine's checks between
units of work, and the app's honest message when a request is stopped."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers.models import make_tiny_vit, rand_image, unit_text

from legrad import LeWrapper
from legrad.engine import deadline as dl


class FakeClock:
    """A clock that advances ``step`` seconds at every reading (the number of readings is counted)."""

    def __init__(self, step: float):
        self.now, self.step, self.reads = 1000.0, step, 0

    def __call__(self) -> float:
        self.reads += 1
        self.now += self.step
        return self.now


def test_no_deadline_is_a_no_op_and_bad_limits_are_refused():
    dl.check_deadline()
    assert dl.time_left() is None
    with dl.deadline(None):
        dl.check_deadline()
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            with dl.deadline(bad):
                pass


def test_past_the_deadline_the_next_check_raises_a_timeout(monkeypatch):
    clock = FakeClock(step=1.0)
    monkeypatch.setattr(dl, "_clock", clock)
    with dl.deadline(2.5):  # set at t=1001, ends at 1003.5
        dl.check_deadline()  # t=1002
        dl.check_deadline()  # t=1003
        with pytest.raises(dl.RequestTimeoutError, match="time limit of 2.5 s") as info:
            dl.check_deadline()  # t=1004
    assert isinstance(info.value, TimeoutError) and info.value.limit_s == 2.5
    dl.check_deadline()  # the limit ended with its block


def test_nested_deadlines_keep_the_earlier_end(monkeypatch):
    monkeypatch.setattr(dl, "_clock", FakeClock(step=0.0))
    with dl.deadline(5):
        with dl.deadline(100):
            assert dl.time_left() == pytest.approx(5)
        with dl.deadline(1):
            assert dl.time_left() == pytest.approx(1)
        assert dl.time_left() == pytest.approx(5)


def test_each_thread_has_its_own_deadline():
    seen = {}
    with dl.deadline(0.000001):
        def other():
            seen["left"] = dl.time_left()
            dl.check_deadline()  # no deadline in this thread: must not raise
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == {"left": None}


def _toy_call(wrapper, image, text):
    return wrapper.compute_legrad(image=image, text_embedding=text)


def test_the_engine_stops_between_units_of_work(monkeypatch):
    model = make_tiny_vit("vit-p8")
    wrapper = LeWrapper(model, layer_index=0)
    image, text = rand_image(1, 64, 64), unit_text(3)
    plain = _toy_call(wrapper, image, text)

    # A generous limit changes nothing: same maps, bit for bit.
    clock = FakeClock(step=0.0)
    monkeypatch.setattr(dl, "_clock", clock)
    with dl.deadline(3600):
        limited = _toy_call(wrapper, image, text)
    assert torch.equal(plain, limited)
    checks = clock.reads - 1  # one reading sets the deadline
    # The engine checks at several points of a call (stages, layers, prompt chunks, query blocks).
    assert checks >= 2 + model.visual.transformer.layers

    # A clock that passes the limit after the third check: the call stops there, long before the end.
    clock = FakeClock(step=1.0)
    monkeypatch.setattr(dl, "_clock", clock)
    with pytest.raises(dl.RequestTimeoutError):
        with dl.deadline(3.5):
            _toy_call(wrapper, image, text)
    assert clock.reads == 1 + 4 < 1 + checks


def test_the_app_answers_a_stopped_request_honestly(monkeypatch):
    from PIL import Image

    from legrad.app.requests import TOY_LABEL, AppSettings, DemoApp, timeout_message

    app = DemoApp(AppSettings(time_limit=0.5))
    monkeypatch.setattr(dl, "_clock", FakeClock(step=1.0))  # every check is a second later
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    gallery, status = app.predict(image, "", "a red circle", TOY_LABEL, "", None, 0.6)
    assert gallery == []
    assert status == timeout_message(0.5)
    assert "time limit of 0.5 s" in status and "--time-limit" in status
    # With the real clock and the default limit the same request is answered.
    monkeypatch.setattr(dl, "_clock", dl.time.monotonic)
    gallery, status = DemoApp().predict(image, "", "a red circle", TOY_LABEL, "", None, 0.6)
    assert len(gallery) == 1, status
