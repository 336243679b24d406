"""Local teachers run their forward passes with a chosen torch thread count (no timings asserted here)."""

from __future__ import annotations

import pytest
import torch

from protege.task import TaskError, parse_task
from protege.teachers import hf
from protege.teachers.hf import HFTeacher, teacher_threads
from tiny import base_task, deep_merge, torch_threads


from test_hf_teacher import model, tok  # noqa: E402,F401,F811  (module fixtures: tiny SmolLM2-tokenizer Llama)


def _task():
    return parse_task(deep_merge(base_task(), {}))


def test_env_setting_is_used_around_forward_passes_and_restored(monkeypatch, model, tok):  # noqa: F811
    monkeypatch.setenv(hf.THREADS_ENV, "1")
    seen = []
    real = model.base_model.forward

    def spy(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    with torch_threads(2):
        monkeypatch.setattr(model.base_model, "forward", spy)
        t = HFTeacher(_task(), model=model, tokenizer=tok)
        assert t.threads == 1
        a = t.answer([t.request("a ripe cherry")])[0]
        assert a.status == "ok"
        assert seen and set(seen) == {1}  # the prefix cache and the batch
        assert torch.get_num_threads() == 2  # the caller's setting is back


def test_default_is_the_cpus_available_capped_by_torch(monkeypatch):
    monkeypatch.delenv(hf.THREADS_ENV, raising=False)
    cfg = _task().teacher
    monkeypatch.setattr(hf, "available_cpus", lambda: 3)
    monkeypatch.setattr(hf, "_PASSIVE_AT_IMPORT", True)
    with torch_threads(8):
        assert teacher_threads(cfg) == 3
    with torch_threads(1):
        assert teacher_threads(cfg) == 1  # OMP_NUM_THREADS / a caller's set_num_threads is a cap
    monkeypatch.setattr(hf, "_PASSIVE_AT_IMPORT", False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with torch_threads(8):
        assert teacher_threads(cfg) == 2  # spinning threads: leave a core to the rest of the box
    monkeypatch.setattr(hf, "available_cpus", lambda: 1)
    with torch_threads(8):
        assert teacher_threads(cfg) == 1


def test_config_field_wins_over_env(monkeypatch):
    monkeypatch.setenv(hf.THREADS_ENV, "3")
    cfg = _task().teacher
    assert teacher_threads(cfg) == 3

    class WithField:  # the TeacherConfig field, once there is one
        torch_threads = 2

    assert teacher_threads(WithField()) == 2


@pytest.mark.parametrize("bad", ["zero", "0", "-2", "1.5"])
def test_bad_env_value_is_an_error_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv(hf.THREADS_ENV, bad)
    with pytest.raises(TaskError, match="thread"):
        teacher_threads(_task().teacher)


def test_seqcls_teacher_uses_the_setting(monkeypatch):
    from transformers import BertConfig, BertForSequenceClassification

    from protege.teachers.hf_seqcls import HFSeqClsTeacher

    labels = base_task()["labels"]
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)})
    m = BertForSequenceClassification(cfg).eval()

    class Tok:
        pad_token_id = 0

        def __call__(self, text, truncation=True, max_length=None):
            class R:
                input_ids = [1 + (ord(c) % 60) for c in text][:max_length]
            return R()

    monkeypatch.setenv(hf.THREADS_ENV, "1")
    seen = []
    real = m.forward
    monkeypatch.setattr(m, "forward", lambda *a, **kw: (seen.append(torch.get_num_threads()), real(*a, **kw))[1])
    task = parse_task(deep_merge(base_task(), {"teacher": {"backend": "hf-seqcls", "model": "x", "gguf_file": None}}))
    with torch_threads(2):
        t = HFSeqClsTeacher(task, model=m, tokenizer=Tok())
        a = t.answer([t.request("moss on a leaf")])[0]
        assert a.status == "ok" and set(seen) == {1} and torch.get_num_threads() == 2
