"""The fast causal-LM path (CTranslate2) against its reference (transformers), and schema-constrained decoding.

A tiny 2-layer Llama with the SmolLM2 tokenizer, saved as a real student folder: float32 CTranslate2 must
decode token for token what transformers decodes; a student trained to answer one JSON object must give
the same object when only its value is decoded, with fewer tokens decoded than the answer has.
"""

from __future__ import annotations

import json

import pytest

from protege.students.causal_lm import CausalLMStudent, common_prefix
from protege.students.fast_lm import ct2_folder, string_fields
from tiny import JSON_ANSWER, JSON_SCHEMA, assert_concurrent_answers_as_alone, assert_decodes_past_escaped_quote, json_speaker, json_student, smollm2_tokenizer, synthetic_rows, tiny_llama

pytest.importorskip("ctranslate2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

ANSWER, SCHEMA = JSON_ANSWER, JSON_SCHEMA


def _student(model, tok, **over) -> CausalLMStudent:
    return json_student(model, tok, over.pop("runtime", "ctranslate2"), **over)


def test_string_fields_only_for_flat_required_string_schemas():
    assert string_fields(SCHEMA) == ["colour", "size"]
    assert string_fields({**SCHEMA, "required": ["colour"]}) is None
    assert string_fields({"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}) is None
    assert string_fields({"type": "object", "properties": {"e": {"type": "string", "enum": ["a"]}},
                          "required": ["e"]}) is None
    assert string_fields(None) is None
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == [1, 2] and common_prefix([[1, 2], [1, 2]]) == [1]


def test_ctranslate2_float32_decodes_exactly_like_transformers(tmp_path):
    tok = smollm2_tokenizer()
    s = _student(tiny_llama(len(tok), seed=4), tok)
    s.save_pretrained(tmp_path / "st")
    assert (ct2_folder(tmp_path / "st", "float32") / "model.bin").is_file()  # exported on save
    loaded = CausalLMStudent.from_pretrained(tmp_path / "st")
    assert loaded.fast is not None and loaded.fast.name == "ctranslate2 float32"
    texts = [r["text"] for r in synthetic_rows(6)]
    fast = loaded.generate(texts, batch_size=4)
    ref = loaded.generate(texts, batch_size=1, reference=True)
    assert [f["text"] for f in fast] == [r["text"] for r in ref]
    assert all(f["decoded_tokens"] == len(r["token_ids"]) for f, r in zip(fast, ref))
    # a folder saved for transformers stays on transformers
    s2 = _student(tiny_llama(len(tok), seed=4), tok, runtime="transformers")
    s2.save_pretrained(tmp_path / "plain")
    assert CausalLMStudent.from_pretrained(tmp_path / "plain").fast is None
    assert not ct2_folder(tmp_path / "plain", "float32").exists()


def _json_speaker(tok):
    return json_speaker(tok)


def test_constrained_decoding_forces_the_keys_and_decodes_only_values(tmp_path):
    tok = smollm2_tokenizer()
    s = _student(_json_speaker(tok), tok, fields=string_fields(SCHEMA))
    s.save_pretrained(tmp_path / "st")
    loaded = CausalLMStudent.from_pretrained(tmp_path / "st")
    assert loaded.fields == ["colour", "size"]
    texts = [r["text"] for r in synthetic_rows(5, start=900)]
    ref = loaded.generate(texts, reference=True)
    assert all(r["text"] == ANSWER for r in ref), [r["text"] for r in ref]
    fast = loaded.generate(texts, batch_size=3)
    assert [json.loads(f["text"]) for f in fast] == [json.loads(ANSWER)] * len(texts)
    total = len(tok(ANSWER, add_special_tokens=False).input_ids)
    # decoded: each value plus its closing-quote token; forced: braces, keys, quotes, separators
    assert all(f["answer_tokens"] == total and f["decoded_tokens"] < total / 2 for f in fast)
    assert all(0.5 < f["confidence"] <= 1.0 for f in fast)


def test_served_student_batches_concurrent_requests(tmp_path):
    """The gateway's predictor: concurrent greedy requests are decoded in one CTranslate2 batch, each answer
    the same as alone; streamed tokens come from the same runtime."""

    from protege.serve.predictor import load_predictor

    tok = smollm2_tokenizer()
    _student(tiny_llama(len(tok), seed=5), tok).save_pretrained(tmp_path / "st")
    p = load_predictor(tmp_path / "st", "m")
    assert p.fast is not None and p.batcher is not None
    texts = [r["text"] for r in synthetic_rows(8)]
    alone = assert_concurrent_answers_as_alone(p, texts)
    streamed = tok.decode([t for t, _ in p.tokens(texts[0])], skip_special_tokens=True).strip()
    assert streamed == alone[0]


def test_a_constrained_value_is_read_as_json_up_to_its_unescaped_quote():
    """Both fast decoders read each value with ``json_string_value``: escapes decoded, an escaped quote not taken
    for the end, a value cut inside an escape kept as written; ``json_string_body`` spells it back as stored."""
    from protege.students.lm_tokens import json_string_body, json_string_value

    assert json_string_value('Dublin", "size": "') == ("Dublin", True)
    assert json_string_value('a\\nb"}') == ("a\nb", True) and json_string_value('caf\\u00e9"') == ("café", True)
    assert json_string_value('x\\\\", "') == ("x\\", True)  # an escaped backslash, then the closing quote
    assert json_string_value('12\\"') == ('12"', False)  # stopped at an escaped quote: the value did not end
    assert json_string_value("cut\\") == ("cut\\", False) and json_string_value("") == ("", False)
    for v in ['12" monitor', "a\nb", "café", "back\\slash"]:
        assert json_string_value(json_string_body(v) + '"') == (v, True)


def test_a_value_holding_an_escaped_quote_is_decoded_past_it(tmp_path):
    assert_decodes_past_escaped_quote(_student, tmp_path)
