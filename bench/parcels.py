"""A parcel-notice extraction task generator: free-text shipping notices -> 5 JSON fields.

Several templates (email, SMS, carrier notice, customs form, terse log line), dates in six spellings
normalised to ISO ``YYYY-MM-DD``, weights in kg / g / lb / oz normalised to kilograms as a decimal string
(``"2.5"``; pounds and ounces converted and rounded to 2 decimals), carrier codes and cities. Every field
is a string, so the schema is the kind the constrained decoder forces (keys, quotes, braces).
Deterministic for a seed.
"""

from __future__ import annotations

import datetime as dt
import random

FIELDS = ["tracking", "sender", "date", "weight_kg", "destination"]
SCHEMA = {"type": "object", "properties": {f: {"type": "string"} for f in FIELDS}, "required": FIELDS,
          "additionalProperties": False}
INSTRUCTION = ("Extract the parcel details. tracking: the tracking code as written; sender: the company sending it; "
               "date: the delivery date as YYYY-MM-DD; weight_kg: the weight in kilograms as a decimal number "
               "(convert g, lb and oz; at most 2 decimals); destination: the destination city.")

SENDERS = ["Acme Tools", "Nordwind GmbH", "Blue Heron Books", "Kettle & Co", "Pixel Forge", "Maison Lune",
           "Oak Street Pharmacy", "Vega Sports", "Lumen Electronics", "Green Basket", "Atlas Outdoor",
           "Copper Kitchen", "Silverline Optics", "Rosa Textiles", "Northpeak Coffee"]
CITIES = ["Berlin", "Paris", "Lisbon", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Dublin", "Oslo",
          "Amsterdam", "Brussels", "Zurich", "Copenhagen", "Helsinki", "Athens", "Budapest", "Lyon", "Munich", "Porto"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _date(rng: random.Random) -> tuple[str, str]:
    d = dt.date(2025, 1, 1) + dt.timedelta(days=rng.randrange(0, 540))
    style = rng.randrange(6)
    text = [d.isoformat(), f"{d.day} {MONTHS[d.month - 1]} {d.year}", f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
            f"{d.day:02d}/{d.month:02d}/{d.year}", f"{d.day}.{d.month}.{d.year}",
            f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}"][style]
    return text, d.isoformat()


def _num(x: float) -> str:
    s = f"{x:.2f}".rstrip("0").rstrip(".")
    return s or "0"


def _weight(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(["kg", "kg", "g", "lb", "oz"])
    if unit == "kg":
        v = round(rng.uniform(0.2, 25), rng.choice([0, 1, 2]))
        return f"{_num(v)} kg", _num(v)
    if unit == "g":
        v = rng.randrange(50, 2000, 10)
        return f"{v} g", _num(v / 1000)
    if unit == "lb":
        v = rng.randrange(1, 40)
        return f"{v} lbs", _num(v * 0.45359237)
    v = rng.randrange(2, 60)
    return f"{v} oz", _num(v * 0.028349523)


def _tracking(rng: random.Random) -> str:
    pre = rng.choice(["ZX", "PK", "DE", "FR", "NL", "QX"])
    return rng.choice([f"{pre}{rng.randrange(10**8, 10**9)}", f"{pre}-{rng.randrange(1000, 9999)}-{rng.randrange(100, 999)}",
                       f"{rng.randrange(10**9, 10**10)}"])


TEMPLATES = [
    "Hello! Your parcel {tracking} from {sender} is on its way. Expected delivery: {date}. Weight: {weight}. "
    "Destination: {city}.",
    "SMS: {sender} shipment {tracking} arrives {date} in {city} ({weight}). Reply STOP to opt out.",
    "Carrier notice - consignment no. {tracking}\nShipper: {sender}\nDeliver to: {city}\nScheduled: {date}\n"
    "Gross weight {weight}",
    "Customs declaration. Sender {sender}; package weight {weight}; tracking number {tracking}; "
    "delivery to {city} planned on {date}.",
    "{date} | {tracking} | {sender} -> {city} | {weight}",
    "Dear customer, {sender} has handed over a {weight} package (ref {tracking}) for delivery in {city}. "
    "We will deliver it on {date}.",
]


def make(n: int, seed: int = 0) -> list[dict]:
    """``n`` items ``{"text", "answer"}`` (answer: the normalised 5-field object)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        date_text, date_iso = _date(rng)
        w_text, w_kg = _weight(rng)
        tr, sender, city = _tracking(rng), rng.choice(SENDERS), rng.choice(CITIES)
        text = rng.choice(TEMPLATES).format(tracking=tr, sender=sender, date=date_text, weight=w_text, city=city)
        out.append({"text": text, "answer": {"tracking": tr, "sender": sender, "date": date_iso, "weight_kg": w_kg,
                                             "destination": city}})
    return out
