"""A third-party package adds a teacher backend and a student kind by entry point, and a task file uses both.

The package is real: a folder on ``sys.path`` with a ``*.dist-info`` holding ``entry_points.txt``, exactly
what ``pip install`` leaves behind, found by ``importlib.metadata`` — no monkeypatching of protege.
"""

from __future__ import annotations

import json
import textwrap

import pytest

PLUGIN = '''
import json
from pathlib import Path

import numpy as np

from protege.teachers.base import Answer, Teacher


class KeywordTeacher(Teacher):
    """Labels by keyword; soft labels peaked on its answer."""

    name = "keyword-teacher"
    local = True

    def request(self, text, sample=0):
        return {"text": text, "labels": list(self.task.labels)}

    def answer(self, requests):
        out = []
        for r in requests:
            lab = "billing" if ("refund" in r["text"] or "charge" in r["text"]) else "bug"
            probs = [0.9 if x == lab else 0.1 / (len(r["labels"]) - 1) for x in r["labels"]]
            out.append(Answer(label=lab, probs=probs, soft="logprobs", text=lab))
        return out


class CentroidStudent:
    """Bag-of-words nearest centroid: the smallest thing with fit / predict_proba / save_pretrained."""

    def __init__(self, labels, centroids=None, vocab=None):
        self.labels, self.centroids, self.vocab, self.history = list(labels), centroids, vocab or {}, []

    @classmethod
    def from_task(cls, task):
        return cls(task.labels)

    def _x(self, texts):
        X = np.zeros((len(texts), len(self.vocab)))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                if w in self.vocab:
                    X[i, self.vocab[w]] += 1
        return X

    def fit(self, texts, probs, hard_labels=None, sample_weight=None):
        words = sorted({w for t in texts for w in t.lower().split()})
        self.vocab = {w: i for i, w in enumerate(words)}
        X = self._x(texts)
        self.centroids = np.stack([X[np.asarray(hard_labels) == k].mean(0) if np.any(np.asarray(hard_labels) == k)
                                   else np.zeros(len(words)) for k in range(len(self.labels))])
        return self

    @property
    def n_params(self):
        return int(self.centroids.size)

    def predict_proba(self, texts):
        d = -((self._x(texts)[:, None, :] - self.centroids[None]) ** 2).sum(-1)
        e = np.exp(d - d.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def predict(self, texts):
        return [self.labels[i] for i in self.predict_proba(texts).argmax(1)]

    def save_pretrained(self, path):
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps({"protege_student": "centroid", "labels": self.labels,
                                                   "vocab": self.vocab, "centroids": self.centroids.tolist()}))

    @classmethod
    def from_pretrained(cls, path):
        c = json.loads((Path(path) / "config.json").read_text())
        return cls(c["labels"], np.array(c["centroids"]), c["vocab"])
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "protege_plug_test").mkdir(parents=True)
    (site / "protege_plug_test" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    dist = site / "protege_plug_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: protege-plug-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[protege.teachers]\nkeyword = protege_plug_test:KeywordTeacher\n\n"
                                           "[protege.students]\ncentroid = protege_plug_test:CentroidStudent\n")
    monkeypatch.syspath_prepend(str(site))
    return site


def _task(tmp_path, backend="keyword", kind="centroid"):
    texts = [f"please refund the charge on order {i}" for i in range(20)] + [f"the app crashes on screen {i}" for i in range(20)]
    (tmp_path / "inputs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    gold = [{"text": f"refund me for invoice {i}", "label": "billing"} for i in range(6)] + \
           [{"text": f"it crashes when I open page {i}", "label": "bug"} for i in range(6)]
    (tmp_path / "gold.jsonl").write_text("".join(json.dumps(g) + "\n" for g in gold))
    return {"name": "plug", "instruction": "Route the ticket.", "labels": ["billing", "bug"],
            "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
            "teacher": {"backend": backend, "model": "keywords"}, "student": {"kind": kind},
            "curate": {"near_duplicate": None, "gold_overlap": None}}


def test_task_file_uses_a_teacher_and_student_from_entry_points(plugin, tmp_path):
    import protege
    from protege.registry import capabilities, names

    assert "keyword" in names("protege.teachers") and "centroid" in names("protege.students")
    assert capabilities("keyword").local and not capabilities("keyword").logits
    task = protege.Task.from_dict(_task(tmp_path), root=tmp_path)
    result = protege.run(task, tmp_path / "run")
    assert result.report.n_eval == 12 and result.report.student.score == 1.0
    student = protege.load_student(result.paths["student"])
    assert type(student).__name__ == "CentroidStudent"
    assert student.predict(["refund my charge", "crashes again"]) == ["billing", "bug"]


def test_unknown_backend_names_the_registered_ones(plugin, tmp_path):
    import protege

    with pytest.raises(protege.TaskError, match=r"'nope' is unknown; use one of \[.*'keyword'"):
        protege.Task.from_dict(_task(tmp_path, backend="nope"), root=tmp_path)
