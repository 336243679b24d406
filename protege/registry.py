"""Teachers and students by name: the built-ins, plus any a third-party package adds by entry point.

A package adds a teacher backend or a student kind without touching protege::

    # its pyproject.toml
    [project.entry-points."protege.teachers"]
    my-api = "my_pkg.teacher:MyTeacher"        # a protege.teachers.base.Teacher subclass
    [project.entry-points."protege.students"]
    my-student = "my_pkg.student:MyStudent"    # fit / predict_proba / save_pretrained / from_pretrained

and a task file says ``teacher: {backend: my-api}`` or ``student: {kind: my-student}``. Names are resolved
lazily: validating a task file reads the entry-point *names* only, and a backend's module (torch,
transformers, an SDK) is imported when that backend is first used.

A teacher class declares what it can do as class attributes (see :class:`Capabilities`) so callers ask
``capabilities(task.teacher.backend).local`` instead of comparing backend names.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Callable

from protege.errors import TaskError

TEACHER_GROUP, STUDENT_GROUP = "protege.teachers", "protege.students"

# name -> "module:attr" (resolved on first use) or the object itself (registered in-process)
TEACHERS: dict[str, Any] = {
    "openai": "protege.teachers.openai:OpenAITeacher",
    "hf": "protege.teachers.hf:HFTeacher",
    "hf-seqcls": "protege.teachers.hf_seqcls:HFSeqClsTeacher",
}
STUDENTS: dict[str, Any] = {
    "auto": "protege.students.ladder:AutoStudent",
    "static": "protege.students.classifier:StaticClassifier",
    "frozen": "protege.students.frozen:FrozenClassifier",
    "encoder": "protege.students.encoder:EncoderClassifier",
    "causal_lm": "protege.students.causal_lm:CausalLMStudent",
}


class RegistryError(TaskError):
    """An unknown name, or an entry point that does not load."""


@dataclass(frozen=True)
class Capabilities:
    """What a teacher backend can do; read from class attributes of the same names (defaults here)."""

    local: bool = False        # runs in this process: priced by wall time, one call at a time in a server
    logits: bool = False       # full next-token logits over the vocabulary (token-level KD, layer-dropped init)
    logprobs: bool = True      # a label distribution / per-token top-k with its answers (soft labels)
    generation: bool = True    # free-text answers (extract / generate tasks)
    concurrent: bool = False   # many requests in flight (an async API client): batch by concurrency


def _discovered(group: str) -> dict[str, Any]:
    try:
        return {ep.name: ep for ep in entry_points(group=group)}
    except Exception:  # noqa: BLE001 - a broken third-party distribution must not break protege
        return {}


def names(group: str) -> list[str]:
    """Every known name: built-ins and entry points."""
    builtin = TEACHERS if group == TEACHER_GROUP else STUDENTS
    return sorted(set(builtin) | set(_discovered(group)))


def resolve(group: str, name: str) -> Any:
    """The class (or factory) registered under ``name``; imports its module on first use."""
    table = TEACHERS if group == TEACHER_GROUP else STUDENTS
    what = "teacher.backend" if group == TEACHER_GROUP else "student.kind"
    obj = table.get(name)
    if obj is None:
        ep = _discovered(group).get(name)
        if ep is None:
            raise RegistryError(f"{what} {name!r} is unknown; use one of {names(group)} (or install the package "
                                f"that provides it: it registers an entry point in group {group!r})")
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001
            raise RegistryError(f"{what} {name!r}: entry point {ep.value!r} does not load ({type(e).__name__}: {e})") from None
    elif isinstance(obj, str):
        mod, _, attr = obj.partition(":")
        obj = getattr(import_module(mod), attr)
    table[name] = obj
    return obj


def register_teacher(name: str) -> Callable[[type], type]:
    """Class decorator: register a teacher backend in this process (entry points do it across packages)."""
    def deco(cls: type) -> type:
        TEACHERS[name] = cls
        return cls

    return deco


def register_student(name: str) -> Callable[[type], type]:
    """Class decorator: register a student kind in this process."""
    def deco(cls: type) -> type:
        STUDENTS[name] = cls
        return cls

    return deco


def teacher_class(backend: str) -> Any:
    return resolve(TEACHER_GROUP, backend)


def student_class(kind: str) -> Any:
    return resolve(STUDENT_GROUP, kind)


def capabilities(backend: str) -> Capabilities:
    """What the teacher backend can do (its class attributes), without building one."""
    cls = teacher_class(backend)
    return Capabilities(**{f: bool(getattr(cls, f, getattr(Capabilities, f))) for f in Capabilities.__dataclass_fields__})


def make_teacher(task) -> Any:
    """The task's teacher, built by the backend its task file names."""
    return teacher_class(task.teacher.backend)(task)


def load_student(path) -> Any:
    """Load any saved student folder; its kind is read from ``config.json`` (``protege_student``)."""
    import json
    from pathlib import Path

    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{p} is not a protege student folder (no config.json)")
    kind = json.loads(cfg_file.read_text(encoding="utf-8")).get("protege_student")
    if kind is None:
        raise ValueError(f"{cfg_file} does not say which protege student it is (no 'protege_student' key)")
    return student_class(kind).from_pretrained(p)
