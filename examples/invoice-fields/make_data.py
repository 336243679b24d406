"""Build invoices.jsonl: short invoice texts with their four gold fields, generated deterministically.

Each item is one invoice written in one of four layouts (labelled lines, an e-mail, a one-line receipt, a
German-style header) with distractors a careless extractor copies by mistake: a subtotal and a tax line
before the total, a customer reference next to the invoice number, a due date after the issue date.
Values are copied verbatim into the answer, so exact match is well defined:

    {"vendor": "...", "invoice_number": "...", "date": "...", "total": "..."}

The first ``N_TRAIN`` items are the unlabelled pool the teacher labels (``inputs.jsonl``, answers left
out); the rest are held out (``gold.jsonl``, never trained on). ``invoices.jsonl`` holds all of them.

    python examples/invoice-fields/make_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED, N_TRAIN, N_EVAL = 7, 160, 60
FIELDS = ("vendor", "invoice_number", "date", "total")

_FIRST = ["Northwind", "Blue Harbor", "Kestrel", "Alder & Finch", "Copperline", "Redwood", "Silverbirch", "Marlow",
          "Greystone", "Oakridge", "Brightwater", "Fenwick", "Hollis", "Juniper", "Lakeside", "Pinecrest"]
_LAST = ["Traders Ltd", "Supplies", "Office GmbH", "Logistics", "Print Co.", "Catering", "IT Services",
         "Hardware Inc.", "Cleaning BV", "Consulting LLP"]
_ITEMS = ["office chairs", "printer toner", "consulting hours", "laptop stands", "catering for 20",
          "server maintenance", "delivery", "cleaning service", "paper reams", "monitor arms"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _money(x: float, rng: random.Random) -> str:
    """Two decimals, with a thousands separator 60% of the time (invoices disagree)."""
    return f"{x:,.2f}" if rng.random() < 0.6 else f"{x:.2f}"


def _fmt_date(y: int, m: int, d: int, fmt: int) -> str:
    name = _MONTHS[m - 1]
    return [f"{y}-{m:02d}-{d:02d}", f"{d} {name} {y}", f"{name} {d}, {y}", f"{d:02d}/{m:02d}/{y}"][fmt]


def _date(rng: random.Random) -> tuple[str, str]:
    """(issue date, due date one month later), in one of four formats."""
    y, m, d = rng.choice([2023, 2024, 2025]), rng.randint(1, 12), rng.randint(1, 28)
    fmt = rng.randrange(4)
    return _fmt_date(y, m, d, fmt), _fmt_date(y, m % 12 + 1, d, fmt)


def _number(rng: random.Random) -> str:
    k = rng.randrange(4)
    if k == 0:
        return f"INV-{rng.randint(1000, 99999)}"
    if k == 1:
        return f"{rng.choice('ABCDEFGHKLMNPRST')}{rng.choice('ABCDEFGHKLMNPRST')}-{rng.randint(10000, 99999)}"
    if k == 2:
        return f"#{rng.randint(100000, 999999)}"
    return f"{rng.choice([2023, 2024, 2025])}/{rng.randint(1000, 9999)}"


def make_item(rng: random.Random) -> dict:
    vendor = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    number, (issue, due) = _number(rng), _date(rng)
    qty, price = rng.randint(1, 40), rng.choice([4.5, 12.0, 19.99, 35.0, 49.5, 85.0, 120.0, 310.0])
    sub = round(qty * price, 2)
    rate = rng.choice([0, 7, 10, 19, 20])
    tax = round(sub * rate / 100, 2)
    total = _money(sub + tax, rng)
    sub_s, tax_s = _money(sub, rng), _money(tax, rng)
    cur = rng.choice(["EUR", "USD", "GBP"])
    sym = {"EUR": "€", "USD": "$", "GBP": "£"}[cur]
    ref = f"CUST-{rng.randint(100, 999)}"
    item = rng.choice(_ITEMS)
    layout = rng.randrange(4)
    if layout == 0:
        text = (f"{vendor}\nInvoice no. {number}\nCustomer ref: {ref}\nDate: {issue}\nDue: {due}\n"
                f"{qty} x {item}: {sym}{sub_s}\nTax {rate}%: {sym}{tax_s}\nTotal due: {sym}{total}")
    elif layout == 1:
        text = (f"Hello,\nplease find attached invoice {number} from {vendor}, issued on {issue} (your reference "
                f"{ref}). It covers {qty} x {item}: subtotal {sub_s} {cur} plus {tax_s} {cur} tax, for a total of "
                f"{total} {cur}, payable by {due}.\nKind regards")
    elif layout == 2:
        text = (f"RECEIPT | {vendor} | No. {number} | {issue} | {item} x{qty} | net {sub_s} | "
                f"amount payable {total} {cur}")
    else:
        text = (f"Rechnung / Invoice\nSeller: {vendor}\nInvoice number: {number}    Invoice date: {issue}\n"
                f"Customer: {ref}\nNet: {sub_s} {cur}   VAT {rate}%: {tax_s} {cur}\nGross total: {total} {cur}")
    return {"text": text, "gold": {"vendor": vendor, "invoice_number": number, "date": issue, "total": total}}


def make(seed: int = SEED, n: int = N_TRAIN + N_EVAL) -> list[dict]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        it = make_item(rng)
        if it["text"] not in seen:
            seen.add(it["text"])
            out.append({"id": f"inv{len(out):04d}", **it})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> None:
    rows = make()
    _write(HERE / "invoices.jsonl", rows)  # everything, for run.py
    # for task.yaml (`protege run`): the pool without its answers, and the held-out gold invoices
    _write(HERE / "inputs.jsonl", [{"id": r["id"], "text": r["text"]} for r in rows[:N_TRAIN]])
    _write(HERE / "gold.jsonl", rows[N_TRAIN:])
    print(f"{len(rows)} invoices → {HERE / 'invoices.jsonl'} (first {N_TRAIN} = teacher pool → inputs.jsonl, "
          f"last {N_EVAL} = held out → gold.jsonl)")


if __name__ == "__main__":
    main()
