"""Codecs side by side: json and msgpack through the hub, beside the pickle floor, in one run.

``python -m benchmarks.codec_bench`` (see benchmarks/README.md, "Codecs"). For each
store and state, every round times, on a fresh key each, in an order that rotates
from round to round so drift on this shared machine hits every side alike:

* each codec: ``key = hub.suspend(state)`` then ``hub.resume(key)``, through a
  ``PersistenceHub`` with encryption required and zstd (level 1) compression;
* the floor: pickle protocol 5, zstd-1, AES-256-GCM and the store's raw driver
  (``floors.Pipeline("pickle", ...)``), unpickled with the cyclic GC paused.

The floor compresses when the serializer's own rule would compress its pickle
(a 64 KB sample must shrink by 10%): random bytes go uncompressed on the floor
too, which makes it the stricter floor there. ``--profile`` times each stage
(codec, compress, checksum and envelope, seal, store) of one side at a time.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import secrets
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"  # noqa: A001

from celery_persist import Keyring, PersistenceHub, StateSerializer  # noqa: E402
from celery_persist.codecs import get_codec, get_compression  # noqa: E402
from celery_persist.keys import key_hash, new_suspension_key  # noqa: E402
from celery_persist.stores import BaseStore, Kind, Status, StoredRecord  # noqa: E402

from . import floors, hub_bench  # noqa: E402
from .hub_bench import _COMP_NAMES, STATES, default_runs, set_clock  # noqa: E402
from .machine import format_machine, machine_info  # noqa: E402
from .report import markdown_table  # noqa: E402
from .states import format_size, parse_size  # noqa: E402
from .targets import make_targets, target_context  # noqa: E402

__all__ = ["CodecCell", "run_codec_cell", "main"]

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
DEFAULT_CELLS = "dict:10KB,dict:1MB,dict:10MB,bytes:10MB"
QUICK_CELLS = "dict:10KB,dict:1MB"
FLOOR = "floor"
#: Targets for a 10 MB state, as ours / floor (ratio of medians).
SUSPEND_TARGET = 1.0
RESUME_TARGET = 1.15


@dataclass
class Side:
    name: str
    suspend: list[float] = field(default_factory=list)
    resume: list[float] = field(default_factory=list)
    stored: int = 0
    applied: str = ""

    def ms(self, which: str, fn: Callable[[list[float]], float] = statistics.median) -> float:
        xs = getattr(self, which)
        return fn(xs) * 1e3 if xs else float("nan")


@dataclass
class CodecCell:
    store: str
    kind: str
    size: int
    runs: int
    sides: dict[str, Side]
    error: str | None = None

    def ratio(self, codec: str, which: str, fn: Callable[[list[float]], float] = statistics.median) -> float:
        return self.sides[codec].ms(which, fn) / self.sides[FLOOR].ms(which, fn)

    def as_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "kind": self.kind,
            "size": self.size,
            "runs": self.runs,
            "error": self.error,
            "sides": {n: vars(s) for n, s in self.sides.items()},
        }


def _floor_compression(state: Any) -> str:
    """What StateSerializer("pickle", "zstd") would apply to this state: zstd, or none when a sample does not shrink."""
    applied = StateSerializer("pickle", "zstd").dumps(state)[8]
    return _COMP_NAMES[applied]


def run_codec_cell(
    store: BaseStore, raw: floors.RawStore, store_name: str, kind: str, size: int, codecs: list[str], runs: int, warmup: int
) -> CodecCell:
    state = STATES.get(kind, size)
    key_bytes = os.urandom(32)
    ring = Keyring([("bench", key_bytes)])
    hubs: dict[str, PersistenceHub] = {}
    cell = CodecCell(store_name, kind, size, runs, {})
    for codec in codecs:
        serializer = StateSerializer(codec, "zstd")
        hubs[codec] = PersistenceHub(store, keyring=ring, serializer=serializer, encryption="required")
        cell.sides[codec] = Side(codec, applied=_COMP_NAMES[serializer.dumps(state)[8]])
    floor_comp = _floor_compression(state)
    pipe = floors.Pipeline("pickle", floor_comp, 1, key_bytes)
    cell.sides[FLOOR] = Side(FLOOR, applied=floor_comp)
    order = [FLOOR, *codecs]
    for i in range(warmup + runs):
        check = i == 0
        shift = i % len(order)
        for name in order[shift:] + order[:shift]:
            side = cell.sides[name]
            if name == FLOOR:
                ts, tr = _floor_round(pipe, raw, state, f"c{i:04d}", side, check)
            else:
                ts, tr = _hub_round(hubs[name], store, state, side, check)
            if i >= warmup:
                side.suspend.append(ts)
                side.resume.append(tr)
    return cell


def _hub_round(hub: PersistenceHub, store: BaseStore, state: Any, side: Side, check: bool) -> tuple[float, float]:
    ts, key = hub_bench._timed(lambda: hub.suspend(state))
    if check:
        rec = store.get(key_hash(key))
        side.stored = len(rec.blob) if rec is not None else 0
    tr, s = hub_bench._timed(lambda: hub.resume(key))
    ok = (not check) or (s.state == state and s.status == "resumed")
    del s
    store.delete(key_hash(key))
    if not ok:
        raise AssertionError(f"{side.name}: hub.resume gave back a different state")
    return ts, tr


def _floor_round(pipe: floors.Pipeline, raw: floors.RawStore, state: Any, fkey: str, side: Side, check: bool) -> tuple[float, float]:
    aad = b"celery-persist-bench\0" + hashlib.sha256(fkey.encode()).hexdigest().encode()
    ts, _ = hub_bench._timed(lambda: raw.put(fkey, pipe.seal(state, aad)))
    if check:
        side.stored = len(raw.get(fkey))
    tr, back = hub_bench._timed(lambda: pipe.open(raw.get(fkey), aad))
    ok = (not check) or back == state
    del back
    raw.delete(fkey)
    if not ok:
        raise AssertionError("the floor gave back a different state")
    return ts, tr


# -- stage breakdown ---------------------------------------------------------------------------


def _median_ms(fn: Callable[[], Any], runs: int, after: Callable[[Any], None] | None = None) -> float:
    times = []
    for _ in range(runs):
        t, out = hub_bench._timed(fn)
        times.append(t)
        if after is not None:
            after(out)
        del out
    return statistics.median(times) * 1e3


def _codec_stages(store: BaseStore, ring: Keyring, kh: str, state: Any, codec: str, runs: int) -> dict[str, float]:
    """Each stage of one codec's suspend and resume through the hub, median ms."""
    zstd = get_compression("zstd")
    ser = StateSerializer(codec, "zstd")
    hub = PersistenceHub(store, keyring=ring, serializer=ser, encryption="required")
    aad = hub._aad(kh, Kind.SUSPENSION, {})
    c = get_codec(codec)
    payload = c.dumps(state)
    envelope = ser.dumps(state)
    compressed = envelope[18:] if envelope[8] else None
    sealed = ring.encrypt(envelope, aad)
    now = time.time()
    rec = StoredRecord(kh, Kind.SUSPENSION, Status.SUSPENDED, sealed, {}, now, None, None, now)
    col = {
        "suspend: codec dumps": _median_ms(lambda: c.dumps(state), runs),
        "suspend: compress": _median_ms(lambda: zstd.compress(payload, 1), runs) if compressed is not None else 0.0,
        "suspend: serializer.dumps (codec + compress + crc32 + envelope)": _median_ms(lambda: ser.dumps(state), runs),
        "suspend: seal (AES-GCM)": _median_ms(lambda: ring.encrypt(envelope, aad), runs),
        "suspend: store.put": _median_ms(lambda: store.put(rec), runs, lambda _: store.delete(kh)),
        "suspend: whole hub.suspend": _median_ms(lambda: hub.suspend(state), runs, lambda k: store.delete(key_hash(k))),
    }
    store.put(rec)
    col["resume: store.get"] = _median_ms(lambda: store.get(kh), runs)
    col["resume: open (AES-GCM)"] = _median_ms(lambda: ring.decrypt(sealed, aad), runs)
    col["resume: crc32 of the envelope"] = _median_ms(lambda: zlib.crc32(envelope), runs)
    if compressed is not None:
        col["resume: decompress"] = _median_ms(lambda: zstd.decompress(compressed, len(payload)), runs)
    else:
        col["resume: decompress"] = 0.0
    col["resume: codec loads (GC paused, then its deferred collection)"] = _median_ms(lambda: c.loads(payload), runs)
    col["resume: serializer.loads (crc32 + decompress + codec)"] = _median_ms(lambda: ser.loads(envelope), runs)
    store.delete(kh)
    times = []
    for _ in range(runs):
        key = hub.suspend(state)
        t, out = hub_bench._timed(lambda key=key: hub.resume(key))
        times.append(t)
        del out
        store.delete(key_hash(key))
    col["resume: whole hub.resume (incl. the status transition)"] = statistics.median(times) * 1e3
    return col


def _floor_stages(raw: floors.RawStore, state: Any, key_bytes: bytes, runs: int) -> dict[str, float]:
    """The floor's stages, under the same names (no envelope, checksum or transition)."""
    zstd = get_compression("zstd")
    floor_comp = _floor_compression(state)
    pipe = floors.Pipeline("pickle", floor_comp, 1, key_bytes)
    aad = b"celery-persist-bench\0floor"
    pickled = pipe.codec_dumps(state)
    encoded = pipe.encode(state)
    blob = pipe.encrypt(encoded, aad)
    col = {
        "suspend: codec dumps": _median_ms(lambda: pipe.codec_dumps(state), runs),
        "suspend: compress": _median_ms(lambda: zstd.compress(pickled, 1), runs) if floor_comp == "zstd" else 0.0,
        "suspend: seal (AES-GCM)": _median_ms(lambda: pipe.encrypt(encoded, aad), runs),
        "suspend: store.put": _median_ms(lambda: raw.put("bd", blob), runs, lambda _: raw.delete("bd")),
        "suspend: whole hub.suspend": _median_ms(lambda: raw.put("bd", pipe.seal(state, aad)), runs, lambda _: raw.delete("bd")),
    }
    raw.put("bd", blob)
    col["resume: store.get"] = _median_ms(lambda: raw.get("bd"), runs)
    col["resume: open (AES-GCM)"] = _median_ms(lambda: pipe.decrypt(blob, aad), runs)
    col["resume: decompress"] = _median_ms(lambda: zstd.decompress(encoded, len(pickled)), runs) if floor_comp == "zstd" else 0.0
    col["resume: codec loads (GC paused, then its deferred collection)"] = _median_ms(lambda: pipe.codec_loads(pickled), runs)
    col["resume: whole hub.resume (incl. the status transition)"] = _median_ms(lambda: pipe.open(raw.get("bd"), aad), runs)
    raw.delete("bd")
    return col


def stage_breakdown(store: BaseStore, raw: floors.RawStore, kind: str, size: int, codecs: list[str], runs: int) -> list[list[str]]:
    """Rows ``[stage, <codec> ms..., floor ms]``: each stage of suspend and resume on its own."""
    state = STATES.get(kind, size)
    key_bytes = os.urandom(32)
    ring = Keyring([("bench", key_bytes)])
    kh = key_hash(new_suspension_key())
    cols = [_codec_stages(store, ring, kh, state, codec, runs) for codec in codecs]
    floor = _floor_stages(raw, state, key_bytes, runs)
    return [[stage] + [_fmt(col[stage]) for col in cols] + [_fmt(floor[stage]) if stage in floor else "-"] for stage in cols[0]]


# -- report ------------------------------------------------------------------------------------


def _fmt(ms: float) -> str:
    if ms != ms:
        return "-"
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _state_label(kind: str, size: int) -> str:
    return f"{format_size(size)} {'dict' if kind == 'dict' else 'incompressible bytes'}"


def tables(cells: list[CodecCell], codecs: list[str]) -> str:
    headers = ["store", "state", "side", "stored", "suspend", "ratio", "(of fastest)", "resume", "ratio", "(of fastest)", "n"]
    rows = []
    for c in cells:
        if c.error:
            rows.append([c.store, _state_label(c.kind, c.size), "error", c.error, "", "", "", "", "", "", ""])
            continue
        for name in [*codecs, FLOOR]:
            s = c.sides[name]
            comp = s.applied if name == FLOOR else f"{s.applied}"
            label = f"pickle floor ({comp})" if name == FLOOR else f"{name} ({comp})"
            is_floor = name == FLOOR
            rows.append(
                [
                    c.store,
                    _state_label(c.kind, c.size),
                    label,
                    f"{s.stored / 1e6:.2f} MB" if s.stored >= 100_000 else f"{s.stored / 1e3:.1f} KB",
                    _fmt(s.ms("suspend")),
                    "" if is_floor else f"{c.ratio(name, 'suspend'):.2f}",
                    "" if is_floor else f"{c.ratio(name, 'suspend', min):.2f}",
                    _fmt(s.ms("resume")),
                    "" if is_floor else f"{c.ratio(name, 'resume'):.2f}",
                    "" if is_floor else f"{c.ratio(name, 'resume', min):.2f}",
                    str(c.runs),
                ]
            )
    out = markdown_table(headers, rows, "lllrrrrrrrr")
    verdicts = []
    for c in cells:
        if c.error or not (c.kind == "dict" and c.size >= 10_000_000):
            continue
        for name in codecs:
            rs, rr = c.ratio(name, "suspend"), c.ratio(name, "resume")
            ok_s, ok_r = rs <= SUSPEND_TARGET, rr <= RESUME_TARGET
            verdicts.append(f"- {c.store}, {name}: suspend {rs:.2f} {'ok' if ok_s else 'MISS'}, resume {rr:.2f} {'ok' if ok_r else 'MISS'}")
    if verdicts:
        out += (
            f"\n\nTarget, 10 MB dict: suspend <= {SUSPEND_TARGET:.2f}x and resume <= {RESUME_TARGET:.2f}x the pickle floor "
            "(ratio of medians):\n\n" + "\n".join(verdicts)
        )
    return out


def _loadavg() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _update_readme(body: str) -> None:
    start, end = "<!-- codec-results:start -->", "<!-- codec-results:end -->"
    with open(README, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(README, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{body.strip()}\n{end}{tail}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.codec_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--stores", default="redis,postgres", help="comma list of benchmark targets (default: redis,postgres)")
    p.add_argument("--cells", default=None, help=f"kind:size list (default {DEFAULT_CELLS}; --quick: {QUICK_CELLS})")
    p.add_argument("--codecs", default="json,msgpack", help="codecs compared with the floor (default: json,msgpack)")
    p.add_argument("--runs", type=int, default=None, help="timed rounds per cell (default: 41 / 15 / 7 for 10 KB / 1 MB / 10 MB)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first")
    p.add_argument("--quick", action="store_true", help="10 KB and 1 MB dicts, few rounds: a smoke check")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--profile", action="store_true", help="stage breakdown of the 10 MB cells instead of the comparison")
    p.add_argument("--json", dest="json_path", default=None, help="write every sample to this JSON file")
    p.add_argument("--markdown", default=None, help="write the report to this Markdown file")
    p.add_argument("--update-readme", action="store_true", help="replace the codec results section of benchmarks/README.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_clock(args.clock)
    run_id = secrets.token_hex(4)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    plan = [
        (k, parse_size(s))
        for k, s in (item.split(":") for item in (args.cells or (QUICK_CELLS if args.quick else DEFAULT_CELLS)).split(","))
    ]
    if args.profile and args.cells is None:
        plan = [("dict", 10_000_000), ("bytes", 10_000_000)]
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    started = time.time()
    load_start = _loadavg()
    machine = machine_info()
    cells: list[CodecCell] = []
    sections: list[str] = []
    notes: list[str] = []
    with target_context(run_id) as ctx:
        opened = []
        for t in make_targets(stores, ctx):
            if t.reason:
                notes.append(f"{t.name}: skipped ({t.reason})")
                continue
            opened.append((t, t.open(), t.make_floor()))
        try:
            # Size-major: each state is built once, then every store takes its turn with it.
            for kind, size in plan:
                for t, store, raw in opened:
                    if args.profile:
                        _progress(f"profile {t.name} {_state_label(kind, size)}")
                        rows = stage_breakdown(store, raw, kind, size, codecs, args.runs or 5)
                        sections.append(
                            f"#### {t.name}: {_state_label(kind, size)}, stages (median ms)\n\n"
                            + markdown_table(["stage", *codecs, "pickle floor"], rows, "l" + "r" * (len(codecs) + 1))
                        )
                        continue
                    runs, warm = default_runs(size, args.quick)
                    runs, warm = args.runs or runs, args.warmup if args.warmup is not None else warm
                    t0 = time.perf_counter()
                    try:
                        cell = run_codec_cell(store, raw, t.name, kind, size, codecs, runs, warm)
                    except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the table
                        cell = CodecCell(t.name, kind, size, runs, {}, error=f"{type(exc).__name__}: {exc}")
                    cells.append(cell)
                    _progress(
                        f"{t.name:8s} {_state_label(kind, size):28s} "
                        + (
                            cell.error
                            if cell.error
                            else "  ".join(f"{c} {cell.ratio(c, 'suspend'):.2f}/{cell.ratio(c, 'resume'):.2f}" for c in codecs)
                        )
                        + f"  ({time.perf_counter() - t0:.1f} s)"
                    )
        finally:
            STATES.clear()
            for t, store, raw in opened:
                try:
                    raw.close()
                finally:
                    if t.drop is not None:
                        t.drop(store)
                    store.close()
    elapsed = time.time() - started
    cmd = "python -m benchmarks.codec_bench " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"Run {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, `{cmd.strip()}`, {elapsed:.0f} s, clock: {args.clock}, "
        f"load average at the start: {load_start}, at the end: {_loadavg()}.\n\n{format_machine(machine)}"
    )
    body = "\n\n".join(sections) if args.profile else tables(cells, codecs)
    if notes:
        body += "\n\nNot measured: " + "; ".join(notes) + "."
    text = header + "\n\n" + body
    print(text)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"cells": [c.as_dict() for c in cells], "elapsed": elapsed, "args": vars(args)}, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.update_readme and not args.profile:
        _update_readme(text)
    return 1 if any(c.error for c in cells) else 0


if __name__ == "__main__":
    gc.collect()
    raise SystemExit(main())
