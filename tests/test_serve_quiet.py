"""Progress-bar quietness is scoped: a gateway silences its own teacher calls, not the whole process."""

from __future__ import annotations

import threading

import pytest

from protege import progress
from protege.serve.gateway import GatewayConfig, create_app
from protege.task import load_task
from protege.teachers.base import Answer, Teacher
from tiny import write_task


class QuietProbe(Teacher):
    """Answers every request with the first label and records whether progress bars were off meanwhile."""

    name = "probe"

    def __init__(self, task):
        super().__init__(task)
        self.quiet_seen: list[bool] = []

    def request(self, text: str, sample: int = 0) -> dict:
        return {"text": text, "labels": self.task.labels}

    def answer(self, requests: list[dict]) -> list[Answer]:
        self.quiet_seen.append(progress.is_quiet())
        n = len(self.task.labels)
        return [Answer(label=self.task.labels[0], probs=[1.0] + [0.0] * (n - 1), soft="hard") for _ in requests]


def _app(tmp_path, **cfg):
    task = load_task(write_task(tmp_path / "task", overrides={"teacher": {"backend": "openai", "model": "probe",
                                                                            "gguf_file": None}}))
    probe = QuietProbe(task)
    settings = task.serve.model_copy(update={"capture": True, "shadow_fraction": 0.0, "rate_limit_per_minute": None})
    app = create_app(GatewayConfig(task, None, serve=settings, teacher=probe, api_keys=[],
                                   data_dir=tmp_path / "serve", **cfg))
    return app, probe


def test_creating_an_app_leaves_progress_bars_on_elsewhere(tmp_path):
    assert not progress.is_quiet()
    app, probe = _app(tmp_path)
    try:
        assert not progress.is_quiet() and not progress.QUIET["on"]  # the process is untouched
        ans, _ = app.state.engine.ask_teacher("a ripe cherry", "capture")
        assert ans.status == "ok" and probe.quiet_seen == [True]  # the gateway's own calls are quiet
        assert not progress.is_quiet()  # ... only while they run
    finally:
        app.state.engine.close()


def test_gateway_quiet_can_be_turned_off(tmp_path):
    app, probe = _app(tmp_path, quiet=False)
    try:
        app.state.engine.ask_teacher("a ripe cherry", "capture")
        assert probe.quiet_seen == [False]
    finally:
        app.state.engine.close()


def test_quiet_block_is_per_thread():
    seen: dict[str, bool] = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(5)
        seen["other"] = progress.is_quiet()
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with progress.quiet():
        seen["here"] = progress.is_quiet()
        inside.set()
        done.wait(5)
    t.join(5)
    assert seen == {"here": True, "other": False}
    assert not progress.is_quiet()
    with progress.quiet(False):
        assert not progress.is_quiet()


def test_global_switch_still_silences_everything(monkeypatch):
    monkeypatch.setitem(progress.QUIET, "on", True)
    assert progress.is_quiet()
    with progress.bar("x", 3) as advance:
        advance()  # the no-op bar


@pytest.mark.parametrize("on", [True, False])
def test_bar_is_a_no_op_inside_quiet(on, capsys):
    with progress.quiet(on), progress.bar("stage-name", 2) as advance:
        advance(2)
    err = capsys.readouterr().err
    assert ("stage-name" in err) is (not on)
