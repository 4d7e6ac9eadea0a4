"""Benchmark states: a realistic nested workflow dict and incompressible bytes.

``workflow_state(size)`` builds a deterministic dict that looks like what a
real order-processing flow parks: orders with customers, addresses, item
lists, prices, free-text notes, booleans and an event history. It grows order
by order until its compact JSON (orjson) reaches ``size`` bytes, so "10 MB"
means ~10 MB of JSON. Text is drawn from a small vocabulary, so it compresses
about as well as real business data (zstd-1 ~3-4x), not like random noise.

``random_bytes(size)`` is ``os.urandom(size)``: nothing to compress, the worst
case for a compressor that does not notice.
"""

from __future__ import annotations

import os
import random
from typing import Any

import orjson

__all__ = ["workflow_state", "random_bytes", "make_state", "KINDS", "parse_size", "format_size"]

KINDS = ("dict", "bytes")

_FIRST = "Ada Alan Grace Linus Guido Barbara Ken Dennis Margaret Edsger Donald Frances Radia Tim Vint Bjarne".split()
_LAST = "Lovelace Turing Hopper Torvalds Rossum Liskov Thompson Ritchie Hamilton Dijkstra Knuth Allen Perlman Lee Cerf".split()
_CITIES = [
    ("Lyon", "FR", "69002"),
    ("Berlin", "DE", "10115"),
    ("Porto", "PT", "4000-322"),
    ("Leeds", "GB", "LS1 4AP"),
    ("Austin", "US", "78701"),
    ("Osaka", "JP", "530-0001"),
    ("Turin", "IT", "10121"),
    ("Gent", "BE", "9000"),
]
_STREETS = "Main High Station Mill Church Park Victoria Bridge Market Garden".split()
_PRODUCTS = [
    ("espresso machine", 249.0),
    ("coffee grinder", 89.5),
    ("milk jug", 12.9),
    ("descaler", 7.49),
    ("bean subscription", 24.0),
    ("tamper", 19.99),
    ("cleaning tablets", 9.95),
    ("cup set", 34.5),
    ("scale", 45.0),
    ("kettle", 59.0),
]
_WORDS = (
    "please deliver before noon leave at the back door customer called about invoice address changed "
    "gift wrap requested fragile handle with care reorder of last month item out of stock substitute "
    "approved by manager waiting for payment confirmation partial shipment split into two parcels"
).split()
_ALNUM = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
_EVENTS = ["created", "paid", "picked", "packed", "shipped", "delayed", "address-checked", "approved"]
_STATUSES = ["pending", "approved", "on-hold", "shipped", "awaiting-review"]


def _note(rng: random.Random) -> str:
    words = []
    for _ in range(rng.randint(0, 30)):
        r = rng.random()
        if r < 0.1:
            words.append(str(rng.randint(1, 99999)))
        elif r < 0.15:
            words.append(f"#{rng.getrandbits(32):08x}")
        else:
            words.append(rng.choice(_WORDS))
    return " ".join(words)


def _order(rng: random.Random, n: int) -> dict[str, Any]:
    city, country, zipcode = rng.choice(_CITIES)
    items = []
    for i in range(rng.randint(1, 6)):
        name, price = rng.choice(_PRODUCTS)
        qty = rng.randint(1, 4)
        items.append(
            {
                "line": i + 1,
                "sku": f"SKU-{rng.randint(10000, 99999)}",
                "name": name,
                "qty": qty,
                "unit_price": price,
                "discount": round(rng.choice([0.0, 0.0, 0.05, 0.1]) * price * qty, 2),
                "taxable": rng.random() < 0.9,
                "backordered": rng.random() < 0.05,
            }
        )
    subtotal = round(sum(it["unit_price"] * it["qty"] - it["discount"] for it in items), 2)
    tax = round(subtotal * 0.2, 2)
    shipping = rng.choice([0.0, 4.9, 9.9])
    t0 = 1_767_225_600 + n * 37
    return {
        "order_id": f"ORD-{2026_000_000 + n}",
        "created_at": f"2026-01-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:{(n * 7) % 60:02d}Z",
        "status": rng.choice(_STATUSES),
        "customer": {
            "id": rng.randint(1, 10_000_000),
            "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
            "email": f"user{rng.randint(1, 10**7)}@example.com",
            "vip": rng.random() < 0.1,
            "address": {
                "street": f"{rng.randint(1, 250)} {rng.choice(_STREETS)} Street",
                "city": city,
                "zip": zipcode,
                "country": country,
            },
            "tags": rng.sample(["b2b", "newsletter", "returning", "wholesale", "trial"], rng.randint(0, 3)),
        },
        "items": items,
        "totals": {"subtotal": subtotal, "tax": tax, "shipping": shipping, "total": round(subtotal + tax + shipping, 2)},
        "currency": "EUR",
        "notes": _note(rng),
        "payment": {
            "ref": f"{rng.getrandbits(128):032x}",
            "method": rng.choice(["card", "sepa", "invoice", "paypal"]),
            "captured": rng.random() < 0.7,
            "amount": round(subtotal + tax + shipping, 2),
            "risk_score": round(rng.random(), 4),
        },
        "shipment": {
            "carrier": rng.choice(["DHL", "UPS", "La Poste", "GLS"]),
            "tracking": "".join(rng.choice(_ALNUM) for _ in range(18)),
            "weight_kg": round(rng.uniform(0.2, 12.0), 3),
        },
        "flags": {"gift": rng.random() < 0.15, "express": rng.random() < 0.3, "fraud_check": rng.random() < 0.02},
        "history": [
            {"at": t0 + k * 600, "event": rng.choice(_EVENTS), "by": rng.choice(["system", "agent", "customer"])}
            for k in range(rng.randint(1, 4))
        ],
    }


def workflow_state(size: int, seed: int = 20260101) -> dict[str, Any]:
    """A deterministic workflow state whose compact JSON is about ``size`` bytes (never less)."""
    rng = random.Random(seed)
    orders: list[dict[str, Any]] = []
    state: dict[str, Any] = {
        "workflow": {
            "id": "wf-order-batch-7",
            "name": "nightly order review",
            "step": 3,
            "approved": False,
            "reviewer": None,
            "started_at": "2026-01-01T00:00:00Z",
            "retries": 0,
        },
        "orders": orders,
    }
    used = len(orjson.dumps(state))
    n = 0
    while used < size:
        order = _order(rng, n)
        orders.append(order)
        used += len(orjson.dumps(order)) + 1
        n += 1
    return state


def random_bytes(size: int) -> bytes:
    """``size`` incompressible bytes."""
    return os.urandom(size)


def make_state(kind: str, size: int) -> Any:
    if kind == "dict":
        return workflow_state(size)
    if kind == "bytes":
        return random_bytes(size)
    raise ValueError(f"unknown state kind {kind!r}; choose one of {KINDS}")


_UNITS = {"b": 1, "kb": 1000, "k": 1000, "mb": 1000**2, "m": 1000**2, "kib": 1024, "mib": 1024**2}


def parse_size(text: str) -> int:
    """``"10KB"`` -> 10000, ``"1MB"`` -> 1000000, ``"2MiB"`` -> 2097152, ``"512"`` -> 512."""
    t = text.strip().lower()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if t.endswith(unit) and t[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[: -len(unit)]) * _UNITS[unit])
    return int(t)


def format_size(n: int) -> str:
    if n >= 1000**2 and n % 1000**2 == 0:
        return f"{n // 1000**2} MB"
    if n >= 1000 and n % 1000 == 0:
        return f"{n // 1000} KB"
    return f"{n} B"
