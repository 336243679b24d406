"""JSON answers and JSON Schema: the one place that parses a model's JSON answer and checks it.

Teachers (re-asking a broken answer), curation (dropping it), the task file (checking its worked
examples) and metrics (JSON validity) all ask the same two questions — "is this text one JSON object?"
and "does it follow the schema?" — so they share these functions: an answer that one stage accepts is
never rejected by another.
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"^\s*```[A-Za-z]*[ \t]*\n?|\n?[ \t]*```\s*$")


def strip_fence(text: str) -> str:
    """```json ... ``` → the JSON inside (some providers fence JSON even in JSON mode)."""
    return _FENCE.sub("", text.strip()).strip()


def load_object(value: Any) -> tuple[dict | None, str | None]:
    """``(object, None)`` for a dict or JSON text (optionally fenced) holding one object, else
    ``(None, why)``."""
    obj = value
    if isinstance(value, str):
        try:
            obj = json.loads(strip_fence(value))
        except (json.JSONDecodeError, ValueError) as e:
            return None, f"not JSON ({getattr(e, 'msg', e)})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object ({type(obj).__name__})"
    return obj, None


def parse_json_object(value: Any) -> dict | None:
    """A model's answer as a JSON object, or None."""
    return load_object(value)[0]


def schema_error(obj: Any, schema: dict | None) -> str | None:
    """Where and why ``obj`` breaks ``schema`` (``"total: 'twelve' is not of type 'number'"``); None if valid."""
    if not schema:
        return None
    import jsonschema

    err = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(obj))
    if err is None:
        return None
    where = "/".join(str(p) for p in err.absolute_path) or "(root)"
    return f"{where}: {err.message}"


def json_schema_reason(value: Any, schema: dict | None) -> str | None:
    """None if ``value`` (a dict, or JSON text optionally in ``` fences) is an object valid against ``schema``;
    otherwise the reason, phrased for a stats table."""
    obj, why = load_object(value)
    if why:
        return why
    err = schema_error(obj, schema)
    return f"schema: {err}" if err else None


def json_valid(value: Any, schema: dict | None = None) -> bool:
    """Parses as a JSON object and, if a schema is given, validates against it."""
    return json_schema_reason(value, schema) is None
