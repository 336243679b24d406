"""The onnxruntime-genai path against its reference (transformers): the same greedy tokens, valid constrained JSON.

A tiny 2-layer Llama with the SmolLM2 tokenizer, saved as a real student folder and converted offline by
onnxruntime-genai's model builder (cached in the folder, reused). Float32 greedy decoding — with prefix KV reuse
and prompt-lookup drafts — must give transformers' tokens exactly; a student trained to answer one JSON object
gives the same object when only its values are decoded.
"""

from __future__ import annotations

import json

import pytest

from protege.students.causal_lm import CausalLMStudent
from protege.students.fast_lm import pick_runtime, string_fields
from protege.students.drafts import ValueMemory, lookup_draft, text_draft
from protege.students.ortgenai_build import ortgenai_folder
from tiny import JSON_ANSWER, JSON_SCHEMA, assert_concurrent_answers_as_alone, assert_decodes_past_escaped_quote, json_speaker, json_student, smollm2_tokenizer, synthetic_rows, tiny_llama

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN = 64  # 4 heads of 16: onnxruntime-genai's CPU attention needs head sizes that are multiples of 16
ANSWER, SCHEMA = JSON_ANSWER, JSON_SCHEMA


def _student(model, tok, **over) -> CausalLMStudent:
    return json_student(model, tok, over.pop("runtime", "ortgenai"), **over)


def _json_speaker(tok):
    return json_speaker(tok, hidden=HIDDEN)


def test_lookup_draft_continues_the_latest_match_of_the_longest_tail():
    src = [5, 1, 2, 3, 4, 9, 1, 2, 7, 8]
    assert lookup_draft([0, 1, 2], src, 3) == [7, 8]  # latest occurrence of (1, 2)
    assert lookup_draft([9, 1, 2, 3], src, 2) == [4, 9]  # (1, 2, 3) beats (2, 3)
    assert lookup_draft([6, 6], src, 3) == [] and lookup_draft([2], src, 3) == []  # no 1-gram drafts
    # ...except a 2+ character token matching its spaced twin: "PK" after a quote is " PK" in the prompt
    words = ["", "PK", "PK", "4", "x"]
    assert lookup_draft([0, 1], [4, 2, 3, 3, 4], 2, words=words) == [3, 3]
    assert lookup_draft([0, 3], [4, 3, 3, 4], 2, words=words) == []  # one character: too weak a match


def test_float32_decodes_exactly_like_transformers_and_the_conversion_is_cached(tmp_path):
    tok = smollm2_tokenizer()
    s = _student(tiny_llama(len(tok), seed=4, hidden=HIDDEN), tok)
    s.save_pretrained(tmp_path / "st")
    folder = ortgenai_folder(tmp_path / "st", "float32")
    assert (folder / "genai_config.json").is_file()  # exported on save
    assert not [p for p in (tmp_path / "st").iterdir() if p.name.startswith(".ortgenai-")]  # no temp left
    stamp = (folder / "model.onnx").stat().st_mtime_ns
    loaded = CausalLMStudent.from_pretrained(tmp_path / "st")
    assert loaded.fast is not None and loaded.fast.name == "onnxruntime-genai float32"
    assert (folder / "model.onnx").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # repeated words make prompt-lookup drafts fire; shared system prompt makes the cache rewind, not restart
    texts = [r["text"] + " red red big red big" for r in synthetic_rows(6)]
    fast = loaded.generate(texts, batch_size=4)
    ref = loaded.generate(texts, batch_size=1, reference=True)
    assert [f["token_ids"] for f in fast] == [r["token_ids"] for r in ref]
    assert [f["text"] for f in fast] == [r["text"] for r in ref]
    streamed = [t for t, _ in loaded.fast.stream(loaded.prompt_ids(texts[0]), 16)]
    assert streamed == [t for t in ref[0]["token_ids"] if t not in loaded.fast.stop_ids]


def test_constrained_decoding_gives_json_with_the_schema_keys(tmp_path):
    tok = smollm2_tokenizer()
    s = _student(_json_speaker(tok), tok, fields=string_fields(SCHEMA))
    s.runtime = "ortgenai"
    s.save_pretrained(tmp_path / "st")
    loaded = CausalLMStudent.from_pretrained(tmp_path / "st")
    texts = [r["text"] for r in synthetic_rows(5, start=900)]
    fast = loaded.generate(texts, batch_size=3)
    assert [json.loads(f["text"]) for f in fast] == [json.loads(ANSWER)] * len(texts)
    total = len(tok(ANSWER, add_special_tokens=False).input_ids)
    assert all(f["answer_tokens"] == total and f["decoded_tokens"] < total / 2 for f in fast)
    assert all(0.5 < f["confidence"] <= 1.0 for f in fast)
    # free decoding of inputs that quote the answer: prompt-lookup drafts fire, and are checked token for token
    loaded.fields, before = None, loaded.fast.passes
    quoting = [t + " " + ANSWER for t in texts]
    free = loaded.generate(quoting)
    assert [f["token_ids"] for f in free] == [r["token_ids"] for r in loaded.generate(quoting, reference=True)]
    assert loaded.fast.passes - before < sum(len(f["token_ids"]) for f in free) / 2
    # a random (untrained) model still gives an object with exactly the schema's keys, in order
    r = _student(tiny_llama(len(tok), seed=9, hidden=HIDDEN), tok, fields=["colour", "size"])
    r.save_pretrained(tmp_path / "rand")
    out = CausalLMStudent.from_pretrained(tmp_path / "rand").generate(texts[:3])
    assert all(list(json.loads(o["text"])) == ["colour", "size"] for o in out)


def test_runtime_choice(tmp_path):
    assert pick_runtime("transformers") is None
    assert pick_runtime("ortgenai") == "ortgenai"
    assert pick_runtime("auto") in ("ortgenai", "ctranslate2")
    with pytest.raises(ValueError, match="student.runtime"):
        pick_runtime("vllm")
    tok = smollm2_tokenizer()
    tiny_llama(len(tok), seed=1).save_pretrained(tmp_path / "h8")  # head size 8: not for onnxruntime-genai
    assert pick_runtime("auto", tmp_path / "h8") in ("ctranslate2", None)
    with pytest.raises(ValueError, match="multiple of 16"):
        pick_runtime("ortgenai", tmp_path / "h8")


def test_task_file_refuses_int4_and_int8_verified_on_ctranslate2_and_takes_them_on_ortgenai(tmp_path):
    from protege.task import TaskError, load_task
    from tiny import write_task

    student = {"kind": "causal_lm", "model": str(tmp_path), "compute_type": "int4"}
    bad = write_task(tmp_path / "a", overrides={"student": {**student, "runtime": "ctranslate2"}})
    with pytest.raises(TaskError, match="student.compute_type.*ortgenai"):
        load_task(bad)
    ok = load_task(write_task(tmp_path / "b", overrides={"student": {**student, "runtime": "ortgenai"}}))
    assert ok.student.runtime == "ortgenai" and ok.student.compute_type == "int4"
    verified = {**student, "compute_type": "int8_verified"}
    with pytest.raises(TaskError, match="int8_verified is for student.runtime: ortgenai"):
        load_task(write_task(tmp_path / "c", overrides={"student": {**verified, "runtime": "ctranslate2"}}))
    assert load_task(write_task(tmp_path / "d", overrides={"student": verified})).student.compute_type == "int8_verified"


def test_served_student_answers_concurrent_requests_as_alone(tmp_path):
    """The gateway's predictor on onnxruntime-genai: concurrent requests share one cache under a lock (the
    batcher hands it a batch, decoded one prompt after another), each answer the same as alone."""

    from protege.serve.predictor import load_predictor

    tok = smollm2_tokenizer()
    _student(tiny_llama(len(tok), seed=5, hidden=HIDDEN), tok).save_pretrained(tmp_path / "st")
    p = load_predictor(tmp_path / "st", "m")
    assert p.fast is not None and p.fast.name == "onnxruntime-genai float32"
    assert_concurrent_answers_as_alone(p, [r["text"] for r in synthetic_rows(6)])


def test_int8_verified_gives_float32_answers_with_the_int8_copy_proposing(tmp_path):
    """``int8_verified``: both copies are exported; the answers are float32's token for token whatever the
    drafter proposes — the int8 copy of the same weights, or another model that disagrees almost everywhere."""
    from protege.students.ortgenai_lm import OrtGenAIDecoder

    tok = smollm2_tokenizer()
    s = _student(tiny_llama(len(tok), seed=4, hidden=HIDDEN), tok, compute_type="int8_verified")
    s.save_pretrained(tmp_path / "st")
    assert (ortgenai_folder(tmp_path / "st", "int8") / "genai_config.json").is_file()
    assert ortgenai_folder(tmp_path / "st", "int8_verified") == ortgenai_folder(tmp_path / "st", "float32")
    loaded = CausalLMStudent.from_pretrained(tmp_path / "st")
    assert loaded.fast.name == "onnxruntime-genai int8_verified" and loaded.fast.drafter.compute_type == "int8"
    texts = [r["text"] + " red red big red big" for r in synthetic_rows(5)]
    ref = [r["token_ids"] for r in loaded.generate(texts, batch_size=1, reference=True)]
    assert [f["token_ids"] for f in loaded.generate(texts)] == ref
    assert loaded.fast.drafter.passes > 0
    drafter, loaded.fields = loaded.fast.drafter, ["colour", "size", "shape"]
    loaded.fast.passes = 0
    fields_ref = loaded.generate(texts)  # constrained: the drafter proposes every value at once
    verified_passes, loaded.fast.drafter, loaded.fast.passes = loaded.fast.passes, None, 0
    assert [f["text"] for f in fields_ref] == [f["text"] for f in loaded.generate(texts)]  # as float32 alone
    assert verified_passes < loaded.fast.passes
    # a drafter that is another model: its proposals are mostly rejected, the answers stay float32's
    _student(tiny_llama(len(tok), seed=11, hidden=HIDDEN), tok).save_pretrained(tmp_path / "other")
    loaded.fast.drafter = OrtGenAIDecoder(ortgenai_folder(tmp_path / "other", "float32"), tok)
    assert [f["text"] for f in loaded.generate(texts)] == [f["text"] for f in fields_ref]
    loaded.fields = None
    assert [f["token_ids"] for f in loaded.generate(texts)] == ref
    assert drafter.compute_type == "int8"


def test_text_draft_copies_what_followed_the_value_in_the_prompt():
    tok = smollm2_tokenizer()

    def enc(s):
        return tok(s, add_special_tokens=False).input_ids

    src = "Parcel for Dublin, arriving soon. Sent from Dubai."
    # the latest occurrence at a word start, and what followed it there
    assert tok.decode(text_draft("Dub", src, 3, enc)) == tok.decode(enc("ai.")[:3])
    assert tok.decode(text_draft("Dubl", src, 2, enc)) == tok.decode(enc("in, arriving")[:2])
    assert text_draft("Cork", src, 3, enc) == [] and text_draft("Dub", src, 0, enc) == []


def test_next_key_in_the_same_pass_saves_passes_and_changes_no_answer(tmp_path):
    """Constrained decoding with the next field's key appended to each pass (``fold_keys``) gives the answers it
    gives without: in fewer passes for a model trained to answer, and the same answers for a random one (whose
    values mostly run to the token limit: the appended keys are computed and dropped)."""
    tok = smollm2_tokenizer()
    texts = [r["text"] for r in synthetic_rows(6, start=700)]
    for name, model, fields in (("trained", _json_speaker(tok), string_fields(SCHEMA)),
                                ("random", tiny_llama(len(tok), seed=9, hidden=HIDDEN), ["colour", "size", "shape"])):
        _student(model, tok, fields=fields).save_pretrained(tmp_path / name)
        s = CausalLMStudent.from_pretrained(tmp_path / name)
        s.fields = fields
        counts, answers = {}, {}
        for fold in (True, False):
            s.fast.fold_keys, s.fast.passes = fold, 0
            answers[fold] = [(o["text"], o["decoded_tokens"]) for o in s.generate(texts, batch_size=1)]
            counts[fold] = s.fast.passes
        assert answers[True] == answers[False], name
        assert counts[True] < counts[False] or name == "random", (name, counts)


def test_value_memory_drafts_whole_answers_in_one_pass_and_changes_no_answer(tmp_path):
    """Candidates from the values the training answers had (saved with the student, loaded with it) are appended
    as a whole guessed answer: a model trained to answer reads every value off the prompt's own pass; a random
    model's answers (which the guesses do not match) are what they are without a memory."""
    tok = smollm2_tokenizer()
    texts = [r["text"] + " in red, big" for r in synthetic_rows(5, start=720)]
    fields = string_fields(SCHEMA)
    for name, model in (("trained", _json_speaker(tok)), ("random", tiny_llama(len(tok), seed=9, hidden=HIDDEN))):
        s = _student(model, tok, fields=fields)
        s.memory = ValueMemory.from_answers([ANSWER] * 3)
        s.save_pretrained(tmp_path / name)
        s = CausalLMStudent.from_pretrained(tmp_path / name)
        assert s.fast.memory is s.memory and s.memory.values["colour"] == {"red": 3}
        counts, answers = {True: 0, False: 0}, {True: [], False: []}
        for use in (True, False):
            for t in texts:  # each item from the same memory (the decoder also remembers its own answers)
                s.fast.memory = ValueMemory.from_json(s.memory.to_json()) if use else ValueMemory()
                s.fast.passes = 0
                answers[use] += [(o["text"], o["decoded_tokens"]) for o in s.generate([t], batch_size=1)]
                counts[use] += s.fast.passes
        assert answers[True] == answers[False], name
        if name == "trained":
            right = sum(a == ANSWER for a, _ in answers[True])  # the tiny model is not always right
            assert right >= 3 and counts[True] <= 2 * len(texts) - right < counts[False], (right, counts)


def test_a_value_holding_an_escaped_quote_is_decoded_past_it(tmp_path):
    assert_decodes_past_escaped_quote(_student, tmp_path, hidden=HIDDEN)
