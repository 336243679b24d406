"""Each curate filter on crafted rows with a known answer; review export → edit → apply round trip."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from protege.artifacts import stage_writer
from protege.kinds import KINDS
from protege.stages.curate import apply_corrections, curate, filter_rows, length_bounds, mix
from protege.schema import json_schema_reason
from protege.data import read_jsonl, text_key, write_jsonl
from protege.stages.dedup import exact_duplicates, jaccard, near_duplicates, overlaps, shingles
from protege.stages.review import export_review, read_corrections, store_corrections, systematic_errors
from protege.task import CurateConfig, TaskError, load_task
from tiny import write_task

LABELS = ["red", "green", "blue"]
OFF = dict(dedup_exact=False, near_duplicate=None, gold_overlap=None, length_iqr_k=None, min_agreement=0.0)

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def row(i: int, text: str | None = None, label: str = "red", conf: float = 0.9, agree: float = 1.0, samples: int = 1,
        status: str = "ok", source: str = "teacher") -> dict:
    text = text if text is not None else f"item {i} " + " ".join(WORDS[(i + k) % 26] for k in range(8))
    return {"id": f"id{i}", "text": text, "label": label, "probs": [conf, (1 - conf) / 2, (1 - conf) / 2],
            "confidence": conf, "agreement": agree, "samples": samples, "status": status, "source": source}


def run(rows, gold=(), **cfg):
    kept, dropped, rep = filter_rows(rows, CurateConfig(**{**OFF, **cfg}), labels=LABELS, gold_texts=gold)
    return [r["id"] for r in kept], {d["id"]: d["reason"] for d in dropped}, rep


# -- single filters ----------------------------------------------------------------------------

def test_teacher_failed_and_invalid_label():
    rows = [row(0), row(1, status="error"), row(2, label="purple"), row(3, label=None)]
    kept, why, rep = run(rows)
    assert kept == ["id0"]
    assert why == {"id1": "teacher_failed", "id2": "invalid", "id3": "invalid"}
    assert rep["invalid"]["dropped"] == 2 and rep["teacher_failed"]["dropped"] == 1


def test_validity_json_schema():
    schema = {"type": "object", "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
              "required": ["total"]}
    assert json_schema_reason('{"total": 12.5, "currency": "EUR"}', schema) is None
    assert json_schema_reason({"total": 3}, schema) is None
    assert json_schema_reason('```json\n{"total": 1}\n```', schema) is None
    assert "not JSON" in json_schema_reason("total: 12", schema)
    assert "not a JSON object" in json_schema_reason("[1, 2]", schema)
    assert "schema: total" in json_schema_reason('{"total": "twelve"}', schema)
    assert "'total' is a required property" in json_schema_reason('{"currency": "EUR"}', schema)
    r = {"output": '{"currency": "EUR"}'}
    assert KINDS["extract"].validity(r, schema=schema) is not None
    assert KINDS["extract"].validity({"output": '{"total": 2}'}, schema=schema) is None
    assert KINDS["classify"].validity({"label": "red"}, LABELS) is None


def test_consistency_needs_samples():
    rows = [row(0, agree=1.0, samples=3), row(1, agree=2 / 3, samples=3), row(2, agree=1 / 3, samples=3),
            row(3, agree=0.5, samples=1)]  # one sample: agreement is not a measurement, never dropped
    kept, why, rep = run(rows, min_agreement=0.6)
    assert kept == ["id0", "id1", "id3"] and why == {"id2": "inconsistent"}
    assert rep["inconsistent"]["measured_rows"] == 3
    _, _, rep1 = run([row(0), row(1)], min_agreement=0.6)
    assert "not measured" in rep1["inconsistent"]["note"]


def test_confidence_threshold():
    kept, why, _ = run([row(0, conf=0.95), row(1, conf=0.5), row(2, conf=0.7)], min_confidence=0.7)
    assert kept == ["id0", "id2"] and why == {"id1": "low_confidence"}


def test_length_absolute_and_tukey():
    lens = [10, 12, 14, 16, 18, 20, 22, 24, 26, 30]
    rows = [row(i, " ".join(["w"] * n)) for i, n in enumerate(lens)]
    rows += [row(10, " ".join(["w"] * 2000)), row(11, "w"), row(12, " ".join(["w"] * 40))]
    # by hand: log1p of the 13 lengths → q1 = log1p(14) = 2.708, q3 = log1p(26) = 3.296, IQR 0.588;
    # k = 1.5 → keep [expm1(2.708 - 0.882), expm1(3.296 + 0.882)] = [5.2, 64.2] words
    lo, hi = length_bounds([len(r["text"].split()) for r in rows], CurateConfig(length_iqr_k=1.5))
    assert lo == pytest.approx(5.2, abs=0.1) and hi == pytest.approx(64.2, abs=0.2)
    kept, why, rep = run(rows, length_iqr_k=1.5)
    assert why == {"id10": "length_outlier", "id11": "length_outlier"}
    kept, why, _ = run(rows, min_words=13, max_words=100)
    assert set(why) == {"id0", "id1", "id10", "id11"}


def test_exact_duplicates_normalised():
    assert exact_duplicates(["Hello,  World", "hello world!", "other", "HELLO world"]) == [None, 0, None, 0]
    rows = [row(0, "The Cat sat."), row(1, "the cat  sat"), row(2, "a dog ran")]
    kept, why, _ = run(rows, dedup_exact=True)
    assert kept == ["id0", "id2"] and why == {"id1": "exact_duplicate"}


def test_near_duplicates_with_known_jaccard():
    base = WORDS[:20]
    one_changed = base[:10] + ["CHANGED"] + base[11:]
    a, b = " ".join(base), " ".join(one_changed)
    # by hand: 18 word 3-grams each; changing word 10 breaks the 3 grams that contain it → 15 shared,
    # union 18 + 3 = 21 → Jaccard 15/21 = 0.714
    assert jaccard(shingles(a), shingles(b)) == pytest.approx(15 / 21)
    far = " ".join(WORDS[6:26])
    assert near_duplicates([a, b, far], 0.7) == [None, (0, pytest.approx(15 / 21)), None]
    assert near_duplicates([a, b, far], 0.75) == [None, None, None]
    rows = [row(0, a), row(1, b), row(2, far)]
    kept, why, _ = run(rows, near_duplicate=0.7)
    assert kept == ["id0", "id2"] and why == {"id1": "near_duplicate"}


def test_gold_overlap_drops_leaks():
    gold = [" ".join(WORDS[:20]), "completely different gold text about something else entirely here"]
    rows = [row(0, " ".join(WORDS[:20]).upper()),                       # exact copy (case differs)
            row(1, " ".join(WORDS[:10] + ["CHANGED"] + WORDS[11:20])),  # Jaccard 0.714 with gold[0]
            row(2, " ".join(WORDS[5:25]))]                              # 10 of 28 grams shared: 0.357
    assert overlaps([r["text"] for r in rows], gold, 0.7) == [(0, 1.0), (0, pytest.approx(15 / 21)), None]
    kept, why, _ = run(rows, gold_overlap=0.7, gold=gold)
    assert kept == ["id2"] and why == {"id0": "gold_overlap", "id1": "gold_overlap"}
    kept, why, _ = run(rows, gold_overlap=None, gold=gold)  # off: exact copies still go
    assert why == {"id0": "gold_overlap"}


def test_first_reason_counted_and_human_rows_win():
    rows = [row(0, "same text here", conf=0.2),             # low confidence
            row(1, "same text here", source="real"),       # human duplicate of a dropped row: kept
            row(2, "same text here", label="purple"),      # invalid and a duplicate: counted as invalid
            row(3, "another text", conf=0.99),
            row(4, "another text", source="review", label="blue")]  # review wins the duplicate
    kept, why, rep = run(rows, dedup_exact=True, min_confidence=0.5)
    assert sorted(kept) == ["id1", "id4"]
    assert why == {"id0": "low_confidence", "id2": "invalid", "id3": "exact_duplicate"}
    assert rep["invalid"]["flagged"] == 1 and rep["low_confidence"]["flagged"] == 1
    assert rep["exact_duplicate"]["dropped"] == 1


# -- corrections and mixing ----------------------------------------------------------------------

def test_apply_corrections_never_trains_on_gold():
    pool = [row(0), row(1), row(2)]
    gold = {"g1": "red", "g2": "blue"}
    rows, st = apply_corrections(pool, {"id0": "green", "id1": "drop", "id2": "red", "g1": "red", "g2": "green",
                                        "nope": "red"}, LABELS, gold)
    by = {r["id"]: r for r in rows}
    assert set(by) == {"id0", "id1", "id2"}  # no gold id ever comes back
    assert by["id0"]["label"] == "green" and by["id0"]["source"] == "review" and by["id0"]["probs"] == [0, 1, 0]
    assert by["id0"]["teacher_label"] == "red"
    assert by["id1"]["_drop"] == "review_dropped"
    assert st["pool_relabelled"] == 1 and st["pool_confirmed"] == 1 and st["pool_dropped"] == 1
    assert st["gold_confirmed"] == 1 and st["gold_disputed"] == [{"id": "g2", "gold": "blue", "reviewer": "green"}]
    assert st["unknown_ids"] == ["nope"]


def test_mix_ratio_and_weight():
    teacher = [row(i) for i in range(8)]
    real = [row(100 + i, source="real") for i in range(8)] + [row(200, source="review")]
    out, st = mix(teacher + real, 0.2, 3.0, seed=0)
    # 8 teacher rows; real share 0.2 → 0.2 * 8 / 0.8 = 2 human rows; data.train rows go before corrections
    assert st["sources"] == {"teacher": 8, "real": 1, "review": 1}
    assert st["real_fraction"] == pytest.approx(0.2) and st["dropped_by_mix"] == 7
    assert {r["weight"] for r in out if r["source"] != "teacher"} == {3.0}
    assert {r["weight"] for r in out if r["source"] == "teacher"} == {1.0}
    out, st = mix(teacher + real[:2], 0.5, 1.0)  # teacher side in excess: 2 * 0.5 / 0.5 = 2 teacher rows
    assert st["sources"] == {"teacher": 2, "real": 2, "review": 0}
    out, st = mix(teacher, 0.5, 1.0)
    assert len(out) == 8 and "no real labelled data" in st["note"]
    out, st = mix(teacher + real, None, 2.0)
    assert len(out) == 17 and st["sources"]["real"] == 8


def test_systematic_errors_worst_first():
    gold = ["red"] * 4 + ["green"] * 4 + ["blue"] * 2
    pred = ["red", "red", "red", "blue"] + ["blue", "blue", "red", "green"] + ["blue", None]
    e = systematic_errors(gold, pred, LABELS)
    assert [d["label"] for d in e["per_label"]] == ["green", "blue", "red"]  # recall 0.25, 0.5, 0.75
    assert e["per_label"][0]["most_confused_with"] == "blue" and e["per_label"][1]["most_confused_with"] == "(invalid)"
    assert e["pairs"][0] == {"gold": "green", "teacher": "blue", "n": 2}
    assert e["confusion"][2] == [0, 0, 1, 1] and e["errors"] == 5 and e["accuracy"] == 0.5


# -- the stage: review export → edit → apply ---------------------------------------------------

def _fake_generate(out: Path, task, pool_rows: list[dict], gold_rows: list[dict]) -> None:
    with stage_writer(out / "generate", {"stage": "generate", "fingerprint": "crafted", "task": task.name}) as tmp:
        write_jsonl(tmp / "train.jsonl", pool_rows)
        write_jsonl(tmp / "gold.jsonl", gold_rows)


@pytest.fixture
def run_dir(tmp_path):
    inputs = [{"text": f"pool text {i}: " + " ".join(WORDS[(3 * i + k) % 26] for k in range(12))} for i in range(12)]
    gold = [{"text": f"gold text {i}: the " + " ".join(WORDS[(5 * i + k) % 26] for k in range(12)), "label": LABELS[i % 3]}
            for i in range(6)]
    train = [{"text": f"real text {i}: " + " ".join(WORDS[(7 * i + k) % 26] for k in range(12)), "label": "blue"}
             for i in range(3)]
    p = write_task(tmp_path / "task", inputs=inputs, gold=gold,
                   overrides={"data": {"train": "train.jsonl"}, "curate": {"review_least_confident": 2},
                              "teacher": {"samples": 3}})
    (tmp_path / "task" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    task = load_task(p)
    out = tmp_path / "run"
    pool = []
    for i, r in enumerate(inputs):
        conf = 0.9 - 0.05 * i
        pool.append({"id": text_key(r["text"]), "text": r["text"], "label": "red", "probs": [conf, 1 - conf, 0.0],
                     "confidence": conf, "agreement": 1.0 if i != 3 else 2 / 3, "samples": 3, "status": "ok"})
    teacher_gold = [{"id": text_key(g["text"]), "label": g["label"] if i not in (1, 4) else "red",
                     "confidence": 0.6 + 0.05 * i, "agreement": 1.0, "status": "ok"} for i, g in enumerate(gold)]
    _fake_generate(out, task, pool, teacher_gold)
    return task, out, pool, gold


def _sheet(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_review_round_trip(run_dir, tmp_path):
    task, out, pool, gold = run_dir
    r = export_review(task, out)
    sheet = _sheet(Path(r["csv"]))
    gold_ids = {text_key(g["text"]): g["label"] for g in gold}
    # gold items 1 (green→red) and 4 (green→red), pool item 3 (2 of 3 samples agree), 2 least confident (10, 11)
    assert [(x["source"], x["reason"]) for x in sheet].count(("gold", "teacher≠gold")) == 2
    assert {x["id"] for x in sheet if x["reason"] == "teacher≠itself"} == {pool[3]["id"]}
    assert {x["id"] for x in sheet if x["reason"] == "teacher unsure"} == {pool[10]["id"], pool[11]["id"]}
    confs = [float(x["teacher_confidence"]) for x in sheet]
    assert confs == sorted(confs, reverse=True)
    assert "teacher systematic errors" in Path(r["html"]).read_text().lower()
    assert r["errors"]["per_label"][0]["label"] == "green" and r["errors"]["per_label"][0]["recall"] == 0.0

    # the reviewer edits the sheet: a pool relabel (case-insensitive), a drop, and both gold items
    g_first, g_second = [x for x in sheet if x["source"] == "gold"]
    edits = {pool[3]["id"]: "Blue", pool[10]["id"]: "drop", g_first["id"]: g_first["gold_label"], g_second["id"]: "red"}
    for x in sheet:
        x["corrected_label"] = edits.get(x["id"], "")
    edited = tmp_path / "edited.csv"
    with open(edited, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(sheet[0]))
        w.writeheader()
        w.writerows(sheet)
    store_corrections(edited, out, task.labels)
    d = curate(task, out)
    rows = {x["id"]: x for x in read_jsonl(d / "train.jsonl")}
    stats = json.loads((d / "stats.json").read_text())
    assert rows[pool[3]["id"]]["label"] == "blue" and rows[pool[3]["id"]]["source"] == "review"
    assert pool[10]["id"] not in rows and stats["dropped"]["review_dropped"] == 1
    assert not set(gold_ids) & set(rows)  # gold corrections never reach training
    assert not {g["text"] for g in gold} & {x["text"] for x in rows.values()}
    assert stats["review"]["gold_confirmed"] == 1
    assert stats["review"]["gold_disputed"] == [{"id": g_second["id"], "gold": "green", "reviewer": "red"}]
    assert stats["sources"] == {"teacher": 10, "real": 3, "review": 1} and stats["n_train"] == 14
    assert {x["source"] for x in rows.values()} == {"teacher", "real", "review"}

    # the corrections live in the run folder: a plain re-run (new config) still applies them,
    # and a fresh review sheet comes pre-filled
    d2 = curate(task.model_copy(update={"curate": task.curate.model_copy(update={"real_weight": 2.0})}), out)
    rows2 = {x["id"]: x for x in read_jsonl(d2 / "train.jsonl")}
    assert rows2[pool[3]["id"]]["label"] == "blue" and rows2[pool[3]["id"]]["weight"] == 2.0
    assert all(x["weight"] == 1.0 for x in rows2.values() if x["source"] == "teacher")
    again = {x["id"]: x["corrected_label"] for x in _sheet(Path(export_review(task, out)["csv"]))}
    assert again[pool[3]["id"]] == "blue" and again[g_second["id"]] == "red"


def test_bad_review_file_names_row(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("id,corrected_label\na,red\nb,\nc,purple\n", encoding="utf-8")
    with pytest.raises(TaskError, match=r"line 4: corrected_label 'purple'"):
        read_corrections(p, LABELS)
    p.write_text("id,label\na,red\n", encoding="utf-8")
    with pytest.raises(TaskError, match="missing column"):
        read_corrections(p, LABELS)


def test_mixed_rows_reach_training_with_their_weights(run_dir):
    from protege.stages.train import train

    task, out, pool, gold = run_dir
    task = task.model_copy(update={"curate": task.curate.model_copy(update={"real_weight": 3.0, "real_fraction": 0.2})})
    cur = json.loads((curate(task, out) / "stats.json").read_text())
    # 12 teacher rows; a real share of 0.2 → round(0.2 * 12 / 0.8) = 3 real rows (all of data.train)
    assert cur["sources"] == {"teacher": 12, "real": 3, "review": 0} and cur["mix"]["dropped_by_mix"] == 0
    task = task.model_copy(update={"curate": task.curate.model_copy(update={"real_fraction": 0.1})})
    cur = json.loads((curate(task, out) / "stats.json").read_text())
    assert cur["sources"] == {"teacher": 12, "real": 1, "review": 0}  # round(0.1 * 12 / 0.9) = 1
    st = json.loads((train(task, out) / "stats.json").read_text())
    assert st["sources"] == cur["sources"]
    assert sum(st["sources_in_fit"].values()) == st["n_train"]
    assert st["weights"]["real"] == [3.0] and st["weights"]["teacher"] == [1.0]
