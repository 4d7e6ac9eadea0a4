"""Tables: the same Markdown goes to the terminal and into README.md."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from .hub_bench import TARGET_RATIO, CellResult
from .states import format_size

__all__ = ["markdown_table", "hub_tables", "target_summary", "fmt_ms"]


def fmt_ms(x: float) -> str:
    if x != x or math.isinf(x):
        return "-"
    if x < 1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    return f"{x:.1f}"


def _fmt_ratio(r: float, flag: bool) -> str:
    if r != r:
        return "-"
    text = f"{r:.2f}"
    return f"**{text}**" if flag and r > TARGET_RATIO else text


def _fmt_bytes(n: int) -> str:
    if n >= 1000**2:
        return f"{n / 1000**2:.2f} MB"
    if n >= 1000:
        return f"{n / 1000:.1f} KB"
    return f"{n} B"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    rows = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    align = align or "l" * len(header)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def _codec_label(r: CellResult) -> str:
    comp = r.compression if r.applied in ("", r.compression) else f"{r.compression}->{r.applied}"
    return f"{r.codec}/{comp}"


def hub_tables(results: list[CellResult]) -> str:
    """One table per state size: ours vs the floor, medians in ms, ratio = ours / floor."""
    out = []
    header = ["store", "state", "codec/compression", "stored", "suspend", "floor", "ratio", "resume", "floor", "ratio", "n"]
    for size in sorted({r.size for r in results}):
        rows = []
        flag = size >= 5_000_000
        for r in [x for x in results if x.size == size]:
            if r.error:
                rows.append([r.store, r.kind, _codec_label(r), "-", "-", "", "", "-", "", "", f"error: {r.error[:70]}"])
                continue
            rows.append(
                [
                    r.store,
                    r.kind,
                    _codec_label(r),
                    _fmt_bytes(r.stored_bytes),
                    fmt_ms(r.suspend_ms),
                    fmt_ms(r.floor_suspend_ms),
                    _fmt_ratio(r.suspend_ratio, flag),
                    fmt_ms(r.resume_ms),
                    fmt_ms(r.floor_resume_ms),
                    _fmt_ratio(r.resume_ratio, flag),
                    str(r.runs),
                ]
            )
        out.append(f"#### {format_size(size)} states (median ms)\n\n" + markdown_table(header, rows, "llllrrrrrrr"))
    return "\n\n".join(out)


def target_summary(results: list[CellResult]) -> str:
    """The 10 MB target: suspend and resume each <= 1.3x the floor of the same store."""
    big = [r for r in results if r.size >= 5_000_000 and not r.error and r.runs]
    if not big:
        return "No 10 MB rows in this run (target not evaluated)."
    rows = []
    misses = 0
    for r in big:
        s_ok = r.suspend_ratio <= TARGET_RATIO
        r_ok = r.resume_ratio <= TARGET_RATIO
        misses += (not s_ok) + (not r_ok)
        rows.append(
            [
                r.store,
                r.kind,
                _codec_label(r),
                f"{r.suspend_ratio:.2f} {'ok' if s_ok else 'MISS'}",
                f"{_min_ratio(r.ours_suspend, r.floor_suspend):.2f}",
                f"{r.resume_ratio:.2f} {'ok' if r_ok else 'MISS'}",
                f"{_min_ratio(r.ours_resume, r.floor_resume):.2f}",
            ]
        )
    head = f"Target: 10 MB encrypted state, suspend and resume each <= {TARGET_RATIO}x the raw floor of the same store. "
    head += f"{len(big) * 2 - misses} of {len(big) * 2} measurements meet it (ratio of medians). "
    head += "The ratio of the fastest runs is shown beside it: noise only ever adds time, so a miss on both is a real one.\n\n"
    header = ["store", "state", "codec/compression", "suspend ratio", "(of fastest)", "resume ratio", "(of fastest)"]
    return head + markdown_table(header, rows, "lllrrrr")


def _min_ratio(ours: list[float], floor: list[float]) -> float:
    return min(ours) / min(floor) if ours and floor else float("nan")
