"""report.html: parses, is self-contained, and carries every plot and section."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

import pytest

from evalrun import make_run
from protege.stages.evaluate import evaluate
from protege.reporting.html import _money, render_html
from protege.task import load_task

PLOTS = {"scores", "confusion matrices", "reliability diagram", "coverage curve", "break-even chart", "latency"}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.stack, self.tables, self.text = {}, [], [], 0, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs[a.get("alt")] = a.get("src", "")
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src"))
        if tag == "table":
            self.tables += 1
        if tag not in ("img", "br", "meta", "link"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    r = evaluate(load_task(make_run(run)), run)
    return run, r


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    assert p.stack == ["html"] or p.stack == [], p.stack  # everything opened was closed (html may be implicit)
    return p


def test_report_html_is_self_contained_with_every_plot(report):
    run, r = report
    page = parse((run / "report.html").read_text(encoding="utf-8"))
    assert PLOTS <= set(page.imgs), set(page.imgs)
    for alt, src in page.imgs.items():
        assert src.startswith("data:image/png;base64,"), alt
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n", alt
    assert not page.links  # no external references at all
    text = " ".join(page.text)
    assert r["verdict"]["decision"].upper() in text and "Worst student errors" in text
    assert r["examples"][0]["text"][:20] in text  # worst errors next to the teacher's answer
    assert page.tables >= 3  # main table, per-label table, errors table


def test_report_renders_without_optional_sections(report):
    _, r = report
    slim = {k: v for k, v in r.items() if k not in ("calibration", "cascade", "confusion", "examples", "data", "metrics")}
    slim["cost"] = {"volume_per_month": 0}
    page = parse(render_html(slim))
    assert {"scores", "latency"} <= set(page.imgs) and "coverage curve" not in page.imgs
    assert "no errors" in " ".join(page.text)


def test_html_escapes_inputs(report):
    _, r = report
    evil = {**r, "examples": [{**r["examples"][0], "text": "<script>alert(1)</script>"}]}
    html = render_html(evil)
    assert "<script>alert" not in html and "&lt;script&gt;" in html


def test_money_is_readable_at_every_scale():
    assert _money(1234.5) == "$1,234.50"
    assert _money(0.006033) == "$0.0060" and _money(0.5) == "$0.50"
    assert _money(3.5e-06) == "$0.0000035"
    assert _money(None) == "—" and _money(0) == "$0.00"
