"""CLI commands for stages 6-7: ``export``, ``serve``, ``drift``, ``redistill`` and the review queue.

Registered on the main Typer app by :mod:`protege.cli` (thin wrappers, like the other commands).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.table import Table


def _task_and_run(target: Path, task_file: Path | None, out: Path | None, load, default_out):
    """``target`` is a task.yaml (run = --out or runs/<name>) or a run folder (task from --task or <run>/task/)."""
    target = Path(target)
    if target.is_file():
        task = load(target)
        return task, Path(out) if out else default_out(task, None)
    if not target.is_dir():
        raise FileNotFoundError(f"{target}: neither a task file nor a run folder")
    if task_file is None and (target / "task" / "task.yaml").is_file():
        task_file = target / "task" / "task.yaml"  # `protege demo` keeps its task there
    return (load(task_file) if task_file else None), target


def _ms(x) -> str:
    return f"{x:.3f}"


def register(app, *, guard, load, out_of, fail, console) -> None:
    """Add the commands to ``app``; ``guard`` / ``load`` / ``out_of`` / ``fail`` are cli.py's helpers."""

    @app.command()
    @guard
    def export(target: Path = typer.Argument(..., help="Run folder (runs/<task>) or task.yaml"),
               fmt: str = typer.Option(..., "--format", "-f", help="hf | onnx | gguf | ollama | jsonl"),
               task_file: Path = typer.Option(None, "--task", help="task.yaml, when TARGET is a run folder"),
               out: Path = typer.Option(None, "--out", "-o", help="Export folder (default <run>/export/<format>)"),
               outtype: str = typer.Option("f16", "--outtype", help="gguf / ollama: f32 | f16 | bf16 | q8_0")):
        """Export the student (hf, onnx int8, gguf + Ollama Modelfile) or the curated data (fine-tune jsonl)."""
        from protege.export import export as run_export

        task, run = _task_and_run(target, task_file, None, load, out_of)
        kw = {"outtype": outtype} if fmt in ("gguf", "ollama") else {}
        r = run_export(run, fmt, task=task, out=out, **kw)
        if fmt == "onnx":
            _print_onnx(r, console)
        elif fmt in ("gguf", "ollama"):
            v = r["verification"]
            console.print(f"GGUF ({r['outtype']}, {r['bytes'] / 1e6:.1f} MB) loaded back with transformers: "
                          f"{v['same_answers']}/{v['n']} answers identical to the HF student, prompt tokens identical "
                          f"{v['same_prompt_ids']}/{v['n']}, max |logit diff| {v['max_abs_logit_diff']:.2e}")
        elif fmt == "jsonl":
            console.print(f"{r['n_train']} training + {r['n_validation']} validation conversations"
                          + "".join(f"; note: {n}" for n in r["notes"]))
        console.print(f"export ({fmt}) → {r['path']}")

    @app.command()
    @guard
    def serve(task: Path = typer.Argument(..., help="Path to task.yaml"),
              out: Path = typer.Option(None, "--out", "-o", help="Run folder (default runs/<task name>)"),
              student: Path = typer.Option(None, "--student", help="Student folder or ONNX export (default <run>/train/student)"),
              host: str = typer.Option(None, "--host", help="Default serve.host (127.0.0.1)"),
              port: int = typer.Option(None, "--port", help="Default serve.port (8000)"),
              capture: bool = typer.Option(None, "--capture/--no-capture", help="Capture mode: the teacher answers, "
                                           "everything is recorded as training data"),
              threshold: float = typer.Option(None, "--threshold", help="Cascade threshold (default: report.json's)"),
              escalate: str = typer.Option(None, "--escalate", help="teacher | review | none")):
        """OpenAI-compatible gateway: the student answers when confident, else the teacher or a person."""
        import logging

        import uvicorn

        from protege.serve.gateway import GatewayConfig, create_app

        t = load(task)
        upd = {k: v for k, v in {"host": host, "port": port, "capture": capture, "threshold": threshold,
                                 "escalate": escalate}.items() if v is not None}
        # exclude_unset: the settings remember which keys the task file set (escalate: none keeps an
        # explicit shadow_fraction, else turns shadow checks off)
        settings = t.serve.model_validate({**t.serve.model_dump(exclude_unset=True), **upd})
        cfg = GatewayConfig(t, out_of(t, out), student=student, serve=settings)
        app_ = create_app(cfg)
        eng = app_.state.engine
        keys = cfg.keys()
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        console.print(f"protege serve: {eng.model_name} on http://{settings.host}:{settings.port}/v1 — "
                      + ("capture mode (teacher answers, traffic recorded)" if settings.capture else
                         f"cascade threshold {eng.threshold:.3f} ({eng.threshold_source}), escalate to {settings.escalate}"))
        if not keys:
            console.print(f"[yellow]no API keys: set {settings.api_keys_env} (comma-separated) to require "
                          f"'Authorization: Bearer <key>'[/]" if settings.api_keys_env else "[yellow]no API keys[/]")
            if settings.host not in ("127.0.0.1", "localhost", "::1"):
                fail(f"refusing to listen on {settings.host} without API keys; set {settings.api_keys_env}")
        console.print(f"traffic: {eng.store.path}")
        # SIGTERM: 3 s for requests in flight, then the engine drops its shadow backlog (≤ 3 s more); an idle
        # keep-alive connection is closed after 5 s; a body not received within 30 s gets 408 (limits.Guard)
        uvicorn.run(app_, host=settings.host, port=settings.port, log_level="info", access_log=False,
                    timeout_graceful_shutdown=3, timeout_keep_alive=5)

    @app.command()
    @guard
    def drift(task: Path = typer.Argument(..., help="Path to task.yaml"),
              out: Path = typer.Option(None, "--out", "-o", help="Run folder (default runs/<task name>)")):
        """Live agreement with the teacher and input drift from the gateway's traffic; says when to re-distill."""
        from protege.serve.drift import Reference, drift_report
        from protege.serve.store import TrafficStore

        t = load(task)
        run = out_of(t, out)
        path = run / "serve" / "traffic.sqlite"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: `protege serve` has not answered any request for this run")
        ref = Reference.load(run / "serve" / "reference.json")
        import json

        from protege.serve.gates import served_threshold, shadow_risk

        report = json.loads((run / "report.json").read_text(encoding="utf-8")) if (run / "report.json").is_file() else None
        if ref is not None and report:
            ref.agreement = (report.get("student") or {}).get("agreement")
        store = TrafficStore(path, writer=False)
        try:
            s = t.serve
            r = drift_report(store, ref, window=s.drift_window, psi_alert=s.psi_alert, centroid_alert=s.centroid_alert,
                             agreement_drop=s.agreement_drop)
            thr, _, gate = served_threshold(run, s, report)
            r["risk_check"] = shadow_risk(store, thr, s.risk if gate is not None else None, s.drift_window)
        finally:
            store.close()
        _print_drift(r, console)

    @app.command()
    @guard
    def redistill(task: Path = typer.Argument(..., help="Path to task.yaml"),
                  out: Path = typer.Option(None, "--out", "-o", help="Run folder (default runs/<task name>)"),
                  min_gain: float = typer.Option(0.0, "--min-gain", help="Promote only when the gold score rises by more"),
                  promote: bool = typer.Option(True, "--promote/--no-promote", help="Replace the run's student when better")):
        """Fold captured, escalated and reviewed traffic into a new generate → curate → train → evaluate round."""
        from protege.serve.redistill import redistill as run_redistill

        t = load(task)
        r = run_redistill(t, out_of(t, out), min_gain=min_gain, promote=promote)
        c = r["counts"]
        console.print(f"traffic: {c['teacher_answered']} teacher-answered inputs, {c['reviewed']} reviewed by a person"
                      + (f"; {c['corrections']} earlier review corrections carried over" if c.get("corrections") else ""))
        if r["status"] == "nothing new":
            console.print(f"redistill: nothing to do ({r['reason']})")
            return
        console.print(f"candidate: {r['candidate']} ({r['metric']} {r['new_score']:.4f} vs current "
                      f"{'—' if r['old_score'] is None else format(r['old_score'], '.4f')} on {r['n_eval']} gold items)")
        console.print(f"[bold]{r['status']}[/]: {r['reason']}")
        if r["promoted"]:
            console.print(f"the run now holds the new student; its task file is {r['task_file']} — restart `protege serve`")


def review_queue(task, run: Path, answers: list[str], reviewer: str | None, console) -> None:
    """``protege review TASK --queue [--answer ID=LABEL ...]``: list and answer the gateway's review queue."""
    from protege.serve.store import TrafficStore

    path = Path(run) / "serve" / "traffic.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the gateway has not queued anything for review in this run")
    store = TrafficStore(path, writer=False)
    try:
        for a in answers:
            item, sep, label = a.partition("=")
            if not sep or not item.strip().isdigit():
                raise ValueError(f"--answer {a!r}: write ID=LABEL (e.g. 12=sports) or ID=drop")
            label = label.strip()
            if label != "drop" and label not in task.labels:
                raise ValueError(f"--answer {a!r}: {label!r} is not one of the labels {task.labels} (or 'drop')")
            store.answer_review(int(item), label, reviewer or os.environ.get("USER"))
            console.print(f"review item {int(item)}: {label}")
        pending = store.review_items("pending")
        done = store.review_items("answered")
    finally:
        store.close()
    tb = Table(title=f"review queue: {len(pending)} pending, {len(done)} answered (answers become training data "
                     f"at the next `protege redistill`)")
    for c in ("id", "student says", "confidence", "text"):
        tb.add_column(c)
    for it in pending[:50]:
        tb.add_row(str(it["id"]), it["student_label"] or "—",
                   "—" if it["student_confidence"] is None else f"{it['student_confidence']:.2f}",
                   it["text"][:100].replace("\n", " "))
    console.print(tb)
    if pending:
        console.print(f"answer with: protege review TASK --answer {pending[0]['id']}=<label> (labels: "
                      f"{', '.join(task.labels)}, or drop)")


def _print_onnx(r: dict, console) -> None:
    p, s = r["parity"], r["speed"]
    tb = Table(title=f"ONNX export of the {r['student']} student: parity on {p['texts']} {p['source']}")
    for c in ("model", "agreement", "max |Δp|", "single ms p50", "batched ms/item", "speedup single", "speedup batched",
              "MB"):
        tb.add_column(c)
    tb.add_row("original", "—", "—", _ms(s["original"]["single_ms_p50"]), _ms(s["original"]["batched_ms_per_item"]),
               "1.0x", "1.0x", "—")
    for k, name, f in (("fp32", "onnx_fp32", "model.onnx"), ("int8", "onnx_int8", "model.int8.onnx")):
        tb.add_row(f, f"{p[k]['agreement']:.2%}" + ("" if p[k]["ok"] else " (< 99%)"), f"{p[k]['max_abs_prob_diff']:.1e}",
                   _ms(s[name]["single_ms_p50"]), _ms(s[name]["batched_ms_per_item"]),
                   f"{s[name]['speedup_single']:.2f}x", f"{s[name]['speedup_batched']:.2f}x",
                   f"{r['sizes_bytes'][f] / 1e6:.1f}")
    console.print(tb)
    console.print(f"recommended: {r['recommended']}")


def _print_drift(r: dict, console) -> None:
    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    c = r["counts"]
    console.print(f"traffic: {c['requests']} requests {c['answered_by']}, {c['shadow']} shadow checks, "
                  f"review queue {c['review'] or 'empty'}")
    tb = Table(title=f"drift over the last {r['n']} requests")
    for col in ("signal", "live", "reference"):
        tb.add_column(col)
    ci = r["agreement_ci"]
    tb.add_row("agreement with teacher (shadow)", f(r["agreement"], ".1%") + (f" [{ci[0]:.1%}, {ci[1]:.1%}] n={r['shadow_n']}"
               if ci else ""), f(r["reference_agreement"], ".1%"))
    tb.add_row("confidence PSI", f(r["psi"], ".3f"), "0.1 moderate / 0.25 large")
    tb.add_row("mean student confidence", f(r["mean_confidence"], ".3f"), f(r["reference_mean_confidence"], ".3f"))
    tb.add_row("input centroid distance (cosine)", f(r["centroid_distance"], ".3f"), "0 = same inputs")
    rc = r.get("risk_check")
    if rc and rc["n"]:
        ci = rc["risk_ci"]
        tb.add_row("disagreement on answered items (shadow)", f"{rc['risk']:.1%} [{ci[0]:.1%}, {ci[1]:.1%}] n={rc['n']}",
                   f"promised ≤ {rc['promised_risk']:.1%}: {rc['status']}")
    console.print(tb)
    console.print(f"[bold]{r['status']}[/]")
    for reason in r["reasons"]:
        console.print(f"  - {reason}", highlight=False)
    if r["status"] == "re-distill":
        console.print("next: protege redistill TASK (folds escalated, captured and reviewed traffic into a new round)")
