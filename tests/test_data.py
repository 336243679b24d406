"""Reading task data: formats, errors that name file + row + fix, gold never leaking into inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from protege.data import (
    check_rows,
    load_gold,
    load_inputs,
    load_real_train,
    read_jsonl,
    read_rows,
    text_key,
    write_json,
    write_jsonl,
)
from protege.task import TaskError, load_task
from tiny import synthetic_rows, write_task


def _err(fn, *a, **kw) -> str:
    with pytest.raises(TaskError) as ei:
        fn(*a, **kw)
    return str(ei.value)


# -- formats -----------------------------------------------------------------------------------

def test_jsonl_skips_blank_lines_and_reads_utf8_bom(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + '{"text": "caf\u00e9"}\n\n{"text": "b"}\n'.encode("utf-8"))
    assert read_rows(p) == [{"text": "caf\u00e9"}, {"text": "b"}]


def test_csv_and_tsv(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",red\nplain,blue\n', encoding="utf-8")
    assert read_rows(p) == [{"text": "hello, world", "label": "red"}, {"text": "plain", "label": "blue"}]
    q = tmp_path / "d.tsv"
    q.write_text("text\tlabel\na, b\tgreen\n", encoding="utf-8")
    assert read_rows(q) == [{"text": "a, b", "label": "green"}]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "label": ["red", "blue"]}), p)
    assert read_rows(p) == [{"text": "x", "label": "red"}, {"text": "y", "label": "blue"}]


def test_json_list(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}]), encoding="utf-8")
    assert read_rows(p) == [{"text": "a"}]
    p.write_text(json.dumps({"text": "a"}), encoding="utf-8")
    assert "list of objects" in _err(read_rows, p)


def test_task_reads_csv_and_parquet_data(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gold = synthetic_rows(6, start=100)
    p = write_task(tmp_path, overrides={"data": {"inputs": "inputs.csv", "gold": "gold.parquet"}})
    (tmp_path / "inputs.csv").write_text("text\n" + "".join(f"input number {i}\n" for i in range(5)), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(gold), tmp_path / "gold.parquet")
    t = load_task(p)
    assert sorted(r["text"] for r in load_inputs(t)) == sorted(f"input number {i}" for i in range(5))
    assert [g["label"] for g in load_gold(t)] == [g["label"] for g in gold]


# -- errors ------------------------------------------------------------------------------------

def test_missing_data_file(tmp_path):
    msg = _err(read_rows, tmp_path / "nope.jsonl")
    assert "nope.jsonl" in msg and "not found" in msg and "relative" in msg


def test_missing_data_file_through_task(tmp_path):
    t = load_task(write_task(tmp_path, overrides={"data": {"inputs": "elsewhere/in.jsonl"}}))
    msg = _err(load_inputs, t)
    assert str(tmp_path / "elsewhere" / "in.jsonl") in msg


@pytest.mark.parametrize("name,content", [("e.jsonl", ""), ("e.jsonl", "\n\n"), ("e.csv", "text,label\n"),
                                          ("e.json", "[]")])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    msg = _err(read_rows, p)
    assert str(p) in msg and "no rows" in msg


def test_unknown_extension(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x", encoding="utf-8")
    msg = _err(read_rows, p)
    assert ".jsonl" in msg and ".parquet" in msg


def test_invalid_json_line_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    msg = _err(read_rows, p)
    assert str(p) in msg and "line 3" in msg and "one JSON object" in msg


def test_json_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n["text", "b"]\n', encoding="utf-8")
    msg = _err(read_rows, p)
    assert "line 2" in msg and "list" in msg


def test_non_utf8_data_file_names_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "caf\xe9"}\n')
    msg = _err(read_rows, p)
    assert str(p) in msg and "line 3" in msg and "UTF-8" in msg and "iconv" in msg


def test_row_without_input_field_names_row(tmp_path):
    rows = [{"text": "a"}, {"text": "b"}, {"body": "c"}]
    msg = _err(check_rows, rows, "in.jsonl", "text")
    assert msg.startswith("in.jsonl: row 3:") and "'text' is missing" in msg and "input_field" in msg


def test_row_with_empty_or_non_text_input(tmp_path):
    assert "row 2" in _err(check_rows, [{"text": "a"}, {"text": "  "}], "f", "text")
    assert "not text (int)" in _err(check_rows, [{"text": 5}], "f", "text")


def test_input_field_from_task(tmp_path):
    p = write_task(tmp_path, overrides={"input_field": "body"})
    msg = _err(load_inputs, load_task(p))  # data has "text", the task says "body"
    assert "gold.jsonl" in msg or "inputs.jsonl" in msg
    assert "row 1" in msg and "'body'" in msg


def test_gold_label_outside_label_set(tmp_path):
    gold = synthetic_rows(5, start=100)
    gold[3]["label"] = "purple"
    t = load_task(write_task(tmp_path, gold=gold))
    msg = _err(load_gold, t)
    assert str(tmp_path / "gold.jsonl") in msg and "row 4" in msg and "'purple'" in msg and "labels" in msg


def test_gold_row_without_label(tmp_path):
    gold = synthetic_rows(3, start=100)
    del gold[1]["label"]
    msg = _err(load_gold, load_task(write_task(tmp_path, gold=gold)))
    assert "row 2" in msg and "gold field 'label' is missing" in msg and "gold_field" in msg


def test_real_train_data_is_validated_too(tmp_path):
    p = write_task(tmp_path, overrides={"data": {"train": "real.jsonl"}})
    (tmp_path / "real.jsonl").write_text('{"text": "x", "label": "red"}\n{"text": "y", "label": "mauve"}\n',
                                         encoding="utf-8")
    msg = _err(load_real_train, load_task(p))
    assert "real.jsonl" in msg and "row 2" in msg and "'mauve'" in msg


# -- inputs vs gold ----------------------------------------------------------------------------

def test_gold_items_are_removed_from_inputs_and_inputs_deduplicated(tmp_path):
    gold = synthetic_rows(6, start=100)
    inputs = [{"text": f"input {i}"} for i in range(10)]
    inputs += [{"text": g["text"]} for g in gold[:3]]  # leak: gold items among the inputs
    inputs += [{"text": "input 4"}, {"text": "input 7"}]  # duplicates
    t = load_task(write_task(tmp_path, inputs=inputs, gold=gold))
    got = load_inputs(t)
    texts = [r["text"] for r in got]
    assert sorted(texts) == sorted(f"input {i}" for i in range(10))
    assert not {g["text"] for g in gold} & set(texts)
    assert all(r["id"] == text_key(r["text"]) for r in got)
    assert len({r["id"] for r in got}) == len(got)


def test_inputs_shuffle_is_seeded_and_limit_applies_after_filtering(tmp_path):
    gold = synthetic_rows(3, start=100)
    inputs = [{"text": g["text"]} for g in gold] + [{"text": f"input {i}"} for i in range(20)]
    p = write_task(tmp_path, inputs=inputs, gold=gold, overrides={"data": {"limit": 5, "seed": 3}})
    a, b = load_inputs(load_task(p)), load_inputs(load_task(p))
    assert a == b and len(a) == 5
    assert all(r["text"].startswith("input ") for r in a)
    p2 = write_task(tmp_path / "other", inputs=inputs, gold=gold, overrides={"data": {"limit": 20, "seed": 4}})
    c = load_inputs(load_task(p2))
    assert len(c) == 20
    assert sorted(r["text"] for r in c) == sorted(f"input {i}" for i in range(20))
    assert [r["text"] for r in c] != [f"input {i}" for i in range(20)]  # shuffled, not file order


def test_gold_labels_are_strings(tmp_path):
    gold = [{"text": "x", "label": "red"}, {"text": "y", "label": "blue"}]
    g = load_gold(load_task(write_task(tmp_path, gold=gold)))
    assert g == [{"id": text_key("x"), "text": "x", "label": "red"}, {"id": text_key("y"), "text": "y", "label": "blue"}]


# -- atomic writes -----------------------------------------------------------------------------

def test_write_jsonl_roundtrip_and_atomic(tmp_path):
    p = tmp_path / "sub" / "x.jsonl"
    write_jsonl(p, [{"a": "\u00e9"}, {"b": 2}])
    assert read_jsonl(p) == [{"a": "\u00e9"}, {"b": 2}]

    def boom():
        yield {"a": 1}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_jsonl(p, boom())
    assert read_jsonl(p) == [{"a": "\u00e9"}, {"b": 2}]  # old file intact
    assert sorted(x.name for x in p.parent.iterdir()) == ["x.jsonl"]  # no temp left behind


def test_write_json(tmp_path):
    write_json(tmp_path / "a.json", {"p": Path("/x")})
    assert json.loads((tmp_path / "a.json").read_text()) == {"p": "/x"}
