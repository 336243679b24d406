"""Does the student pay? The verdict's cost and latency rules, for every task kind.

A student that keeps the teacher's quality is still not worth shipping if one call costs more than the
teacher's (a causal LM decoding on a small CPU can cost 20x an API call), or if it is slower than the
latency budget the user set (``student.max_ms``). Then the verdict says so, and what would make it pay:
the latency (or the hardware price) at which it breaks even with the teacher, from figures the report
already has. Speed is phrased as "N× faster" or "N× slower" — a ratio below one is never printed as
"0.0x faster".
"""

from __future__ import annotations

from protege.reporting.fmt import speed_words


def speed_phrase(speedup: float | None) -> str:
    """" and 230x faster" / " and 1.8x faster" / " but 3.2x slower" / "" (unknown)."""
    words = speed_words(speedup)
    return "" if not words else (f" and {words}" if speedup >= 1 else f" but {words}")


def economics(r: dict, *, max_ms: float | None, usd_per_hour: float) -> dict | None:
    """None when the student pays; else ``{"decision", "text"}`` saying why not and what would make it pay.

    ``max_ms``: the user's latency budget (None when the task file did not set one)."""
    cost, s = r.get("cost") or {}, r.get("student") or {}
    t_call, s_call = cost.get("teacher_usd_per_call"), cost.get("student_usd_per_call")
    s_ms = s.get("ms_per_item")
    if max_ms is not None and s_ms is not None and s_ms > max_ms:
        return {"decision": "too slow", "text": (
            f"Not yet: the student takes {s_ms:,.1f} ms per item (single-item p50), over the {max_ms:g} ms budget "
            f"(student.max_ms). A smaller or faster student (the ladder's cheaper rungs, an int8 / GGUF runtime), "
            f"faster hardware, or a larger budget would change that.")}
    if t_call is None or s_call is None or not s_ms or s_call <= t_call or t_call <= 0:
        return None  # cheaper, or the teacher's price is unknown ($0: no price for the model and none in the task)
    ratio = s_call / t_call
    even_ms = t_call * 3600 * 1000 / usd_per_hour if usd_per_hour > 0 else None
    even_hour = t_call * 3600 / (s_ms / 1000)
    fixes = []
    if even_ms is not None:
        fixes.append(f"{even_ms:,.1f} ms per item ({s_ms / even_ms:,.1f}x faster than now)")
    fixes.append(f"hardware at or below ${even_hour:,.4f}/hour (now ${usd_per_hour:g})")
    speed = speed_phrase(r.get("speedup")).removeprefix(" and ").removeprefix(" but ")
    return {"decision": "costs more", "text": (
        f"Not yet: the student costs ${s_call * 1e6:,.2f} per 1M calls against the teacher's ${t_call * 1e6:,.2f} "
        f"({ratio:,.1f}x more" + (f"; it is {speed}" if speed else "") + "), so it never pays off at any volume. "
        "It breaks even at " + " or ".join(fixes) + "; a smaller student or a faster runtime gets there.")}


def gate(r: dict, quality: dict, *, max_ms: float | None, usd_per_hour: float) -> dict:
    """The quality verdict, overruled when the student does not pay (only a 'ship' or 'cascade' is)."""
    if quality.get("decision") in ("ship", "cascade"):
        e = economics(r, max_ms=max_ms, usd_per_hour=usd_per_hour)
        if e is not None:
            return {**e, "quality": quality["text"]}
    return quality


def explicit_max_ms(task) -> float | None:
    """``student.max_ms`` when the task file sets it: the default is the ladder's budget for classifier rungs,
    not a promise about a causal LM's latency."""
    return task.student.max_ms if "max_ms" in task.student.model_fields_set else None
