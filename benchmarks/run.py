"""``python -m benchmarks`` (or ``python benchmarks/run.py``): run the benchmarks, print the tables.

Suites:
    (default)        hub suspend/resume vs the raw floor, every store, 10 KB / 1 MB / 10 MB
    --celery         the Celery benchmark only (real worker subprocess)
    --all            both
    --profile        stage breakdown + cProfile of a 10 MB suspend/resume per store

Common choices: ``--stores sqlite,postgres``, ``--sizes 1MB,10MB``, ``--kinds dict``,
``--compressions zstd``, ``--runs 5``, ``--quick`` (under a minute: CI smoke),
``--json out.json``, ``--markdown out.md``, ``--update-readme`` (rewrites the
results section of benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import time
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make the repository importable and re-enter as the package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"  # noqa: A001

from .hub_bench import CODEC_FOR_KIND, STATES, Cell, CellResult, default_runs, run_cell, set_clock  # noqa: E402
from .machine import format_machine, machine_info  # noqa: E402
from .report import hub_tables, target_summary  # noqa: E402
from .states import KINDS, format_size, parse_size  # noqa: E402
from .targets import ALL_TARGETS, Target, make_targets, target_context  # noqa: E402

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
COMPRESSIONS = ("zstd", "gzip", "none")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    suite = p.add_mutually_exclusive_group()
    suite.add_argument("--celery", action="store_true", help="run the Celery benchmark only")
    suite.add_argument("--all", action="store_true", help="run the hub and the Celery benchmarks")
    suite.add_argument("--profile", action="store_true", help="stage breakdown + cProfile for the largest size")
    p.add_argument("--quick", action="store_true", help="small sizes, few runs: a smoke check under a minute")
    p.add_argument("--stores", default=None, help=f"comma list from {','.join(ALL_TARGETS)} (default: all)")
    p.add_argument("--sizes", default=None, help="comma list, e.g. 10KB,1MB,10MB (default; --quick: 10KB,1MB)")
    p.add_argument("--kinds", default=",".join(KINDS), help="dict (nested workflow state, json codec), bytes (os.urandom, pickle codec)")
    p.add_argument("--compressions", default=None, help="comma list from zstd,gzip,none (default all; --quick: zstd)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per cell (default: 41 / 15 / 7 for 10 KB / 1 MB / 10 MB)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds before the timed ones")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time (default) or this process's CPU time")
    p.add_argument("--celery-stores", default=None, help="stores for the Celery benchmark (default redis,postgres,sqlite; --quick: sqlite)")
    p.add_argument("--flows", type=int, default=None, help="flows for the Celery latency benchmark (default 200; --quick 20)")
    p.add_argument("--throughput", type=int, default=None, help="flows for the Celery throughput benchmark (default 2000; --quick 100)")
    p.add_argument("--celery-profile", action="store_true", help="cProfile the persist.resume() calls of the Celery latency loop")
    p.add_argument("--json", dest="json_path", default=None, help="write every measurement to this JSON file")
    p.add_argument("--markdown", default=None, help="write the tables to this Markdown file")
    p.add_argument("--update-readme", action="store_true", help="replace the results section of benchmarks/README.md")
    p.add_argument("--top", type=int, default=20, help="cProfile lines per table (--profile)")
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _hub_plan(args: argparse.Namespace) -> tuple[list[str], list[int], list[str], list[str]]:
    stores = _csv(args.stores) if args.stores else list(ALL_TARGETS)
    sizes = [parse_size(s) for s in _csv(args.sizes or ("10KB,1MB" if args.quick else "10KB,1MB,10MB"))]
    kinds = _csv(args.kinds)
    comps = _csv(args.compressions or ("zstd" if args.quick else ",".join(COMPRESSIONS)))
    return stores, sizes, kinds, comps


def _cells(args: argparse.Namespace, t: Target, sizes: list[int], kinds: list[str], comps: list[str], notes: list[str]) -> list[Cell]:
    cells = []
    limit = t.max_size
    if args.quick and t.isolate:
        limit = min(limit or 100_000, 100_000)  # a smoke run must not sit out a hang
    for size in sizes:
        if limit is not None and size > limit:
            notes.append(f"{t.name}: {format_size(size)} not run (limit {format_size(limit)} here)")
            continue
        for kind in kinds:
            for comp in comps:
                runs, warm = default_runs(size, args.quick)
                runs = args.runs or runs
                if t.slow_runs is not None and size >= 100_000:
                    runs = min(runs, t.slow_runs)
                cells.append(Cell(t.name, kind, size, comp, CODEC_FOR_KIND[kind], runs, args.warmup if args.warmup is not None else warm))
    return cells


def _report(r: CellResult, started: float) -> None:
    _progress(
        f"{r.store:9s} {r.kind:5s} {format_size(r.size):>6s} {r.compression:4s} "
        + (
            f"error {r.error}"
            if r.error
            else f"suspend {r.suspend_ms:8.2f} / {r.floor_suspend_ms:8.2f} = {r.suspend_ratio:4.2f}  "
            f"resume {r.resume_ms:8.2f} / {r.floor_resume_ms:8.2f} = {r.resume_ratio:4.2f}  "
            f"({time.perf_counter() - started:.1f} s)"
        )
    )


def _run_target_cells(t: Target, store: Any, raw: Any, cells: list[Cell], sink: Any = None) -> list[CellResult]:
    out = []
    for cell in cells:
        t0 = time.perf_counter()
        try:
            r = run_cell(cell, store, t.make_floor, raw)
        except Exception as exc:  # noqa: BLE001 - one failing cell must not lose the table
            r = CellResult(t.name, cell.kind, cell.codec, cell.size, cell.compression, error=f"{type(exc).__name__}: {exc}")
        out.append(r)
        _report(r, t0)
        if sink is not None:
            sink.write(json.dumps(r.as_dict()) + "\n")
            sink.flush()
    return out


def run_hub(args: argparse.Namespace, run_id: str) -> tuple[list[CellResult], list[str]]:
    """Every cell of every usable target; targets marked ``isolate`` run in a watched child process."""
    stores, sizes, kinds, comps = _hub_plan(args)
    results: list[CellResult] = []
    notes: list[str] = []
    with target_context(run_id) as ctx:
        targets = make_targets(stores, ctx)
        opened: list[tuple[Target, Any, Any]] = []
        isolated: list[Target] = []
        for t in targets:
            if t.reason:
                notes.append(f"{t.name}: skipped ({t.reason})")
                _progress(f"{t.name}: skipped: {t.reason}")
                continue
            if t.isolate and not args.child_out:
                isolated.append(t)
                continue
            try:
                store = t.open()
            except Exception as exc:  # noqa: BLE001 - a store being written right now may not open yet
                notes.append(f"{t.name}: skipped (store did not open: {type(exc).__name__}: {exc})")
                _progress(f"{t.name}: store did not open: {exc!r}")
                continue
            try:
                raw = t.make_floor()
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{t.name}: skipped (raw floor did not open: {type(exc).__name__}: {exc})")
                _progress(f"{t.name}: raw floor did not open: {exc!r}")
                _close(t, store)
                continue
            opened.append((t, store, raw))
        sink = open(args.child_out, "a", encoding="utf-8") if args.child_out else None  # noqa: SIM115
        try:
            # Size-major order: each state is built once and every store takes its turn with it.
            for size in sizes:
                for kind in kinds:
                    for t, store, raw in opened:
                        cells = [c for c in _cells(args, t, [size], [kind], comps, notes)]
                        results += _run_target_cells(t, store, raw, cells, sink)
        finally:
            if sink is not None:
                sink.close()
            STATES.clear()
            for t, store, raw in opened:
                try:
                    raw.close()
                finally:
                    _close(t, store)
        for t in isolated:
            results += _run_isolated(args, run_id, t, sizes, kinds, comps, notes)
    order = {name: i for i, name in enumerate(stores)}
    results.sort(
        key=lambda r: (r.size, KINDS.index(r.kind) if r.kind in KINDS else 9, order.get(r.store, 99), COMPRESSIONS.index(r.compression))
    )
    return results, sorted(set(notes), key=notes.index)


def _run_isolated(
    args: argparse.Namespace, run_id: str, t: Target, sizes: list[int], kinds: list[str], comps: list[str], notes: list[str]
) -> list[CellResult]:
    """Run one target's cells in a child process, killed when a cell makes no progress for ``t.cell_timeout`` s.

    The server (and, for FalkorDB, its Bolt relay) stays in this process, so a hung
    child can be killed without leaking it; this process then drops what the child wrote.
    """
    import subprocess
    import tempfile

    cells = _cells(args, t, sizes, kinds, comps, notes)
    if not cells:
        return []
    fd, out_path = tempfile.mkstemp(prefix="cp-bench-child-", suffix=".jsonl", dir="/tmp")
    os.close(fd)
    env = dict(os.environ)
    env.update(t.child_env)
    child_id = f"{run_id}c"
    env["CP_BENCH_RUN_ID"] = child_id
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    argv = [
        sys.executable,
        "-m",
        "benchmarks",
        "--stores",
        t.name,
        "--child-out",
        out_path,
        "--sizes",
        ",".join(str(s) for s in sizes),
        "--kinds",
        ",".join(kinds),
        "--compressions",
        ",".join(comps),
        "--clock",
        args.clock,
    ]
    for flag, value in (("--runs", args.runs), ("--warmup", args.warmup)):
        if value is not None:
            argv += [flag, str(value)]
    if args.quick:
        argv.append("--quick")
    _progress(f"{t.name}: running in a child process (a cell silent for {t.cell_timeout:.0f} s is killed)")
    proc = subprocess.Popen(argv, cwd=repo, env=env, start_new_session=True)
    done: list[CellResult] = []
    last_size, last_change = 0, time.monotonic()
    killed = False
    try:
        while proc.poll() is None:
            size = os.path.getsize(out_path)
            if size != last_size:
                last_size, last_change = size, time.monotonic()
            elif time.monotonic() - last_change > t.cell_timeout:
                _progress(f"{t.name}: no progress for {t.cell_timeout:.0f} s: killing the child")
                killed = True
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            import signal

            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        with open(out_path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                r = CellResult(
                    d["store"],
                    d["kind"],
                    d["codec"],
                    d["size"],
                    d["compression"],
                    applied=d["applied"],
                    stored_bytes=d["stored_bytes"],
                    runs=d["runs"],
                    ours_suspend=d["ours_suspend"],
                    ours_resume=d["ours_resume"],
                    floor_suspend=d["floor_suspend"],
                    floor_resume=d["floor_resume"],
                    error=d["error"],
                )
                done.append(r)
        os.unlink(out_path)
        # A killed child could not remove its scratch directory.
        import glob
        import shutil

        for leftover in glob.glob(f"/tmp/cp-bench-{child_id}-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if t.drop is not None:
            try:
                store = t.open()
                _close(t, store)
                t.make_floor().close()
            except Exception as exc:  # noqa: BLE001
                _progress(f"{t.name}: cleanup after the child failed: {exc!r}")
    missing = cells[len(done) :]
    for i, cell in enumerate(missing):
        if i == 0:
            reason = f"hung: no reply for {t.cell_timeout:.0f} s, child killed" if killed else "child process exited early"
        else:
            reason = "not run: an earlier cell hung"
        done.append(CellResult(t.name, cell.kind, cell.codec, cell.size, cell.compression, error=reason))
    return done


def _close(t: Any, store: Any) -> None:
    try:
        if t.drop is not None:
            t.drop(store)
    except Exception as exc:  # noqa: BLE001
        _progress(f"{t.name}: cleanup failed: {exc!r}")
    finally:
        store.close()


def run_profile(args: argparse.Namespace, run_id: str) -> str:
    from .profile_hub import breakdown, profile_cell
    from .report import fmt_ms, markdown_table

    stores = _csv(args.stores) if args.stores else ["memory", "file", "sqlite", "postgres", "redis"]
    size = parse_size(_csv(args.sizes or "10MB")[-1])
    kinds = _csv(args.kinds)
    comps = _csv(args.compressions or "zstd")
    out = []
    with target_context(run_id) as ctx:
        for t in make_targets(stores, ctx):
            if t.reason:
                out.append(f"{t.name}: skipped ({t.reason})")
                continue
            store = t.open()
            raw = t.make_floor()
            try:
                for kind in kinds:
                    for comp in comps:
                        _progress(f"profile {t.name} {kind} {format_size(size)} {comp}")
                        rows = breakdown(store, raw, kind, size, comp, runs=args.runs or 5)
                        out.append(
                            f"#### {t.name}: {kind} {format_size(size)}, {CODEC_FOR_KIND[kind]}/{comp}: stages (median ms)\n\n"
                            + markdown_table(["stage", "ours", "floor"], [[n, fmt_ms(a), fmt_ms(b)] for n, a, b in rows], "lrr")
                        )
                        out.append("```\n" + profile_cell(store, kind, size, comp, top=args.top) + "```")
            finally:
                raw.close()
                _close(t, store)
        STATES.clear()
    return "\n\n".join(out)


def _update_readme(section: str, body: str) -> None:
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    with open(README, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        text = text.rstrip() + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(README, "w", encoding="utf-8") as f:
        f.write(f"{head}{start}\n{body.strip()}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_clock(args.clock)
    run_id = os.environ.get("CP_BENCH_RUN_ID") if args.child_out else None
    run_id = run_id or secrets.token_hex(4)
    started = time.time()
    info = machine_info()
    parts: list[str] = []
    payload: dict[str, Any] = {"machine": info, "args": vars(args), "started": started}
    cmd = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    status = 0

    if args.profile:
        text = run_profile(args, run_id)
        print(text)
        if args.markdown:
            with open(args.markdown, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return 0

    if args.child_out:
        run_hub(args, run_id)
        return 0

    hub_md = celery_md = ""
    if not args.celery:
        results, notes = run_hub(args, run_id)
        payload["hub"] = [r.as_dict() for r in results]
        payload["hub_notes"] = notes
        hub_md = hub_tables(results)
        if notes:
            hub_md += "\n\nNot measured: " + "; ".join(notes) + "."
        hub_md += "\n\n" + target_summary(results)
        if any(r.error for r in results):
            status = 1
    if args.celery or args.all:
        from .celery_bench import celery_tables, run_celery_bench

        flows = args.flows or (20 if args.quick else 200)
        tp = args.throughput if args.throughput is not None else (100 if args.quick else 2000)
        cstores = _csv(args.celery_stores or ("sqlite" if args.quick else "redis,postgres,sqlite"))
        cres = run_celery_bench(cstores, flows, tp, _progress, profile=args.celery_profile)
        payload["celery"] = [r.as_dict() for r in cres]
        celery_md = celery_tables(cres)
        for r in cres:
            if r.profile:
                print(f"cProfile of persist.resume() ({r.store}):\n{r.profile}", file=sys.stderr)
        if any(r.error for r in cres):
            status = 1

    elapsed = time.time() - started
    try:
        load_end = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load_end = "?"
    header = (
        f"Run {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))}, `{cmd.strip()}`, {elapsed:.0f} s, "
        f"clock: {args.clock}, load average at the end: {load_end}." + "\n\n" + format_machine(info)
    )
    if hub_md:
        parts.append("### Hub suspend / resume vs raw floor\n\n" + hub_md)
    if celery_md:
        parts.append("### Celery\n\n" + celery_md)
    text = header + "\n\n" + "\n\n".join(parts)
    print(text)
    if args.json_path:
        payload["elapsed"] = elapsed
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1, default=str)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    if args.update_readme:
        if hub_md:
            _update_readme("hub-results", header + "\n\n" + hub_md)
        if celery_md:
            _update_readme("celery-results", header + "\n\n" + celery_md)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
