"""Command line: ``celery -A proj persist ...`` and the standalone ``celery-persist``.

``celery persist`` works on the app's configured store and can resume and
cancel flows (it dispatches through the app). ``celery-persist --store URL``
works on a store alone: list, show, stats, cleanup --dry-run, rotate-keys,
and ``demo``. Keys and secrets come from the environment, as for workers.

Exit codes follow Celery's (``os.EX_*``): 0 ok, 1 refused (already resumed,
expired, cancelled), 2 usage (click's), 65 malformed or forged key / bad input,
66 unknown suspension, 69 store unavailable, 78 configuration error (a bad
setting, or no key that opens the store's encrypted records).

``show`` and ``cancel`` take a suspension key, or the fingerprint ``list``
prints (any unique prefix of the key hash, at least :data:`MIN_PREFIX` hex
characters): an operator with the store and its keys needs no key to inspect
or cancel. ``resume`` always needs the key: it is the capability.

``--json`` output is stable: one JSON document per command; the fields
documented in the README only grow, never change meaning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import click

from . import flow, journal
from .config import embedded_keyring
from .crypto import Keyring, new_key_line
from .errors import (
    AlreadyResumed,
    ConfigurationError,
    EncryptionError,
    InvalidInput,
    InvalidKey,
    PersistenceError,
    StoreUnavailable,
    SuspensionCancelled,
    SuspensionExpired,
    SuspensionNotFound,
)
from .hub import PersistenceHub, Suspension
from .keys import key_hash
from .registry import Binding, binding_of
from .stores import open_store
from .stores.base import Kind
from .waits import WAITS
from .web.cli import serve_command

__all__ = ["persist", "main"]

_EXIT = (
    ((InvalidKey, InvalidInput), os.EX_DATAERR),
    (SuspensionNotFound, os.EX_NOINPUT),
    ((AlreadyResumed, SuspensionExpired, SuspensionCancelled), 1),
    (StoreUnavailable, os.EX_UNAVAILABLE),
    # The keys here cannot open a record (none configured, most often): configuration, like a
    # missing key under persist_encryption="required". A record tampered with fails its seal
    # check (IntegrityError) before its blob is ever opened, so it does not land here.
    ((ConfigurationError, EncryptionError), os.EX_CONFIG),
    (PersistenceError, 1),
)

#: The fewest hex characters of a fingerprint ``show`` and ``cancel`` accept (``list`` prints 12).
MIN_PREFIX = 6
_HEX = re.compile(r"[0-9a-fA-F]+")
#: How many matches an ambiguous fingerprint lists.
_SHOWN_MATCHES = 10


class _Ops:
    """What a command works with: a hub, and the Persist of an app when there is one."""

    def __init__(self, hub: PersistenceHub, binding: Binding | None = None) -> None:
        self._hub: PersistenceHub | None = hub
        self.binding = binding

    @property
    def hub(self) -> PersistenceHub:
        assert self._hub is not None
        return self._hub


@contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except PersistenceError as exc:
        for cls, code in _EXIT:
            if isinstance(exc, cls):
                click.echo(f"Error: {type(exc).__name__}: {exc}", err=True)
                if isinstance(exc, InvalidInput):
                    for problem in exc.errors:
                        click.echo(f"  {'.'.join(map(str, problem['loc'])) or 'input'}: {problem['msg']}", err=True)
                if isinstance(exc, EncryptionError):
                    click.echo("hint: set CELERY_PERSIST_KEYS (or persist_keys) to the keys the workers use", err=True)
                sys.exit(code)
        raise


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _when(ts: Any) -> datetime | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc) if isinstance(ts, int | float) else None


def _wait_of(s: Suspension) -> str:
    """What ``s`` waits for; a record written before timers and events existed waits for input."""
    wait = s.metadata.get("wait")
    return wait if isinstance(wait, str) and wait else "input"


def _summary(s: Suspension) -> dict[str, Any]:
    md = s.metadata
    wait = _wait_of(s)
    return {
        "fingerprint": s.fingerprint,
        "status": s.status,
        "wait": wait,
        "prompt": md.get("prompt"),
        "wake_at": md.get("wake_at") if wait == "timer" else None,
        "topic": md.get("topic") if wait == "event" else None,
        "event_key": md.get("event_key") if wait == "event" else None,
        "task": md.get("task"),
        "task_id": md.get("task_id"),
        "created_at": _iso(s.created_at),
        "expires_at": _iso(s.expires_at),
    }


def _waiting_for(row: dict[str, Any]) -> str:
    """The last column of ``list``: the prompt, the wake time, or the topic and key."""
    if row["wait"] == "timer":
        return f"wake_at={row['wake_at'] or '-'}"
    if row["wait"] == "event":
        return f"topic={row['topic'] or '-'} key={row['event_key'] or '-'}"
    return str(row["prompt"] or "")


def _echo_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))


def _read_input(input_json: str | None, input_file: str | None, null: bool) -> Any:
    given = [name for name, value in (("--input", input_json), ("--input-file", input_file)) if value is not None]
    if null:
        given.append("--null")
    if not given:
        # A forgotten input must not resume the flow with None: the flow would go on with it, once.
        raise click.UsageError("give the resume input: --input JSON, --input-file F, or --null to resume with null")
    if len(given) > 1:
        raise click.UsageError(f"give one of --input, --input-file and --null, not {' and '.join(given)}")
    if null:
        return None
    text = input_json
    if input_file is not None:
        with click.open_file(input_file) as fh:
            text = fh.read()
    assert text is not None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        click.echo(f"Error: the input is not valid JSON: {exc.msg} (line {exc.lineno})", err=True)
        sys.exit(os.EX_DATAERR)


def _fingerprint_of(ref: str) -> str | None:
    """``ref`` lowercased when it is a fingerprint (hex: a key never is, it starts with ``p1.``), else None."""
    if not _HEX.fullmatch(ref):
        return None
    if len(ref) < MIN_PREFIX or len(ref) > 64:
        raise click.BadParameter(
            f"a fingerprint needs {MIN_PREFIX} to 64 hex characters (list prints 12); a key starts with p1.", param_hint="KEY"
        )
    return ref.lower()


def _key_hash(hub: PersistenceHub, prefix: str) -> str:
    """The key hash of the one suspension whose hash starts with ``prefix``.

    Stores list in key-hash order strictly after a cursor, so a scan from the
    prefix itself starts at the first hash that extends it: a lookup reads the
    matches and one row more, not the whole store.

    Raises:
        SuspensionNotFound: Nothing matches.
        click.UsageError: More than one suspension matches (they are listed).
    """
    if len(prefix) == 64:
        matches = [prefix] if hub.peek(prefix) is not None else []
    else:
        matches = []
        cursor: str | None = prefix
        while cursor is not None and len(matches) <= _SHOWN_MATCHES:
            page = hub.store.scan(kind=Kind.SUSPENSION, limit=_SHOWN_MATCHES + 1, cursor=cursor)
            ended = False
            for rec in page.items:
                if not rec.key_hash.startswith(prefix):
                    ended = True
                    break
                if rec.poisoned is None:
                    matches.append(rec.key_hash)
            cursor = None if ended else page.next_cursor
    if not matches:
        raise SuspensionNotFound(f"no suspension has a fingerprint starting with {prefix}", store=hub.store.name)
    if len(matches) > 1:
        width = max(12, len(prefix) + 1)
        shown = ", ".join(h[:width] for h in matches[:_SHOWN_MATCHES])
        more = ", ..." if len(matches) > _SHOWN_MATCHES else ""
        raise click.UsageError(f"the fingerprint {prefix} is ambiguous; it matches {shown}{more}: give more characters")
    return matches[0]


def _task_checkpoints(hub: PersistenceHub, *, batch: int = 1000) -> int:
    """How many checkpoint records hold a task's checkpoint.

    ``hub.stats()`` counts every record that is not a suspension; most of them
    are celery-persist's own bookkeeping (park journals, dispatch records, the
    inputs journal of a task that never checkpointed). A task's checkpoint is
    the journal that ``PersistentTask.checkpoint`` wrote, and that write
    (:func:`celery_persist.journal.save_state`) stamps ``checkpoint_at`` on its
    clear metadata, which later writes keep.
    """
    count = 0
    cursor: str | None = None
    while True:
        page = hub.store.scan(kind=Kind.CHECKPOINT, limit=batch, cursor=cursor)
        count += sum(1 for rec in page.items if rec.poisoned is None and "checkpoint_at" in rec.metadata)
        cursor = page.next_cursor
        if cursor is None:
            return count


# -- commands shared by both entry points ----------------------------------------------------------


@click.command("list")
@click.option(
    "--status", type=click.Choice(["suspended", "claimed", "resumed", "cancelled", "expired"]), help="Only suspensions in this status."
)
@click.option(
    "--kind",
    type=click.Choice(WAITS),
    help="Only flows waiting for this: input (await_input), timer (sleep) or event (await_event).",
)
@click.option("--older-than", type=float, metavar="SECONDS", help="Only suspensions created more than SECONDS ago.")
@click.option("--limit", type=int, default=1000, show_default=True, help="Stop after this many rows.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list.")
@click.pass_obj
def list_cmd(ops: _Ops, status: str | None, kind: str | None, older_than: float | None, limit: int, as_json: bool) -> None:
    """List suspensions (never their state or keys).

    Each row says what the flow waits for: input (with its prompt), timer
    (with its wake_at) or event (with its topic and key).
    """
    rows: list[dict[str, Any]] = []
    cutoff = None if older_than is None else time.time() - older_than
    with _errors():
        cursor: str | None = None
        while len(rows) < limit:
            page = ops.hub.list(status=status, limit=min(500, limit), cursor=cursor)
            for s in page.items:
                if cutoff is not None and s.created_at and s.created_at.timestamp() > cutoff:
                    continue
                if kind is not None and _wait_of(s) != kind:
                    continue
                rows.append(_summary(s))
            cursor = page.next_cursor
            if cursor is None:
                break
    rows = rows[:limit]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no suspensions")
        return
    click.echo(f"{'FINGERPRINT':<13} {'STATUS':<10} {'WAIT':<6} {'CREATED (UTC)':<20} {'EXPIRES (UTC)':<20} {'TASK':<28} WAITING FOR")
    for r in rows:
        click.echo(
            f"{r['fingerprint']:<13} {r['status']:<10} {r['wait']:<6} {(r['created_at'] or '-')[:19]:<20} "
            f"{(r['expires_at'] or '-')[:19]:<20} {(r['task'] or '-')[:28]:<28} {_waiting_for(r)}".rstrip()
        )


@click.command("show")
@click.argument("key")
@click.option("--reveal-state", is_flag=True, help="Also print the (decrypted) state; needs the key, not a fingerprint.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--history", "with_history", is_flag=True, help="Also print its audit history (suspended, denied, approved, resumed...).")
@click.pass_obj
def show_cmd(ops: _Ops, key: str, reveal_state: bool, as_json: bool, with_history: bool) -> None:
    """Show one suspension: status, what it waits for, times, task and chain, last checkpoint.

    KEY is the suspension key, or its fingerprint as `list` prints it (any
    unique prefix of at least 6 hex characters).
    """
    prefix = _fingerprint_of(key)
    if prefix is not None and reveal_state:
        raise click.UsageError("--reveal-state needs the suspension key; a fingerprint shows everything but the state")
    with _errors():
        if prefix is None:
            s = ops.hub.load(key)
        else:
            kh = _key_hash(ops.hub, prefix)
            found = ops.hub.peek(kh)
            if found is None:  # gone since the lookup
                raise SuspensionNotFound("no suspension is stored under this key hash", key=kh[:12], store=ops.hub.store.name)
            s = found
    doc = _summary(s)
    md = s.metadata
    doc["root_id"] = md.get("root_id")
    doc["chain"] = md.get("chain_tasks") or []
    doc["on_timeout"] = md.get("on_timeout")
    kh = key_hash(ops.hub.unwrap_key(key)) if prefix is None else _key_hash(ops.hub, prefix)
    if md.get("schema") is not None:
        doc["schema"] = md.get("schema")
    if md.get("approvals") is not None or md.get("approvers") is not None:
        with _errors():
            done = ops.hub.approvals(kh)
        doc["approvals"] = {
            "needed": md.get("approvals", 1),
            "approvers": md.get("approvers"),
            "done": [{"by": a.get("by"), "at": _iso(_when(a.get("at")))} for a in done],
        }
    if with_history:
        with _errors():
            doc["history"] = [{**h, "at": _iso(_when(h.get("at")))} for h in ops.hub.history_of(kh)]
    if md.get("kind") == "task" and md.get("task_id"):
        record = ops.hub.checkpoint_record(journal.name_of(str(md["task_id"])))
        if record is not None:
            doc["last_checkpoint_at"] = record.metadata.get("checkpoint_at")
            doc["worker"] = record.metadata.get("worker")
    if reveal_state:
        doc["state"] = s.state
    if as_json:
        _echo_json(doc)
        return
    for name, value in doc.items():
        if name in ("wake_at", "topic", "event_key") and value is None:
            continue  # another kind of wait's detail
        if name in ("state", "schema", "approvals"):
            value = json.dumps(value, default=str)
        if name == "history":
            click.echo("history:")
            for h in value:
                extra = " ".join(f"{k}={h[k]}" for k in ("by", "reason") if h.get(k))
                click.echo(f"  {h['at']}  {h['event']:<10} {extra}".rstrip())
            continue
        click.echo(f"{name + ':':<20} {value if value not in (None, []) else '-'}")


@click.command("cancel")
@click.argument("key")
@click.pass_obj
def cancel_cmd(ops: _Ops, key: str) -> None:
    """Cancel a suspension (its parked task becomes REVOKED).

    KEY is the suspension key, or its fingerprint as `list` prints it (any
    unique prefix of at least 6 hex characters); cancelling by fingerprint
    needs the keys the workers use.
    """
    prefix = _fingerprint_of(key)
    with _errors():
        if prefix is None:
            s = flow.cancel(ops.binding, key) if ops.binding else ops.hub.cancel(key)
        else:
            s = ops.hub.cancel_by_hash(_key_hash(ops.hub, prefix))
            if ops.binding:
                flow.revoke_flow(ops.binding, s)
    click.echo(f"cancelled suspension {s.fingerprint}")


@click.command("cleanup")
@click.option("--dry-run", is_flag=True, help="Only count what is due.")
@click.pass_obj
def cleanup_cmd(ops: _Ops, dry_run: bool) -> None:
    """Apply timeouts, re-open lapsed leases and prune expired records."""
    with _errors():
        if dry_run:
            due = ops.hub.store.due(time.time(), limit=100_000)
            counts: dict[str, int] = {}
            for rec in due:
                label = f"{rec.kind.value}/{rec.status.value}"
                counts[label] = counts.get(label, 0) + 1
            click.echo(f"{len(due)} record(s) due" + "".join(f"\n  {k}: {v}" for k, v in sorted(counts.items())))
            return
        if ops.binding is None:
            raise click.UsageError(
                "cleanup runs timeout policies (errbacks, defaults) through the Celery app: "
                "use `celery -A proj persist cleanup`, or --dry-run here"
            )
        n = flow.cleanup(ops.binding)
    click.echo(f"cleaned up {n} record(s)")


@click.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def stats_cmd(ops: _Ops, as_json: bool) -> None:
    """Counts by status, task checkpoints, oldest suspension, store health."""
    with _errors():
        doc = ops.hub.stats()
        # hub.stats() counts every non-suspension record; shown as checkpoints are the tasks' own.
        records = doc["checkpoints"]
        doc["checkpoints"] = _task_checkpoints(ops.hub)
        doc["internal"] = max(0, records - doc["checkpoints"])
    doc["health"] = ops.hub.health()
    if as_json:
        _echo_json(doc)
        return
    for status, count in sorted(doc["suspensions"].items()):
        click.echo(f"{status + ':':<14} {count}")
    click.echo(f"{'checkpoints:':<14} {doc['checkpoints']}")
    click.echo(f"{'internal:':<14} {doc['internal']} (park journals, dispatch records, history, indexes)")
    age = doc["oldest_suspended_age"]
    click.echo(f"{'oldest:':<14} {'-' if age is None else f'{age:.0f} s'}")
    health = doc["health"]
    click.echo(f"{'store:':<14} {health.get('store')} ({'ok' if health.get('ok') else 'NOT OK'})")
    click.echo(f"{'encryption:':<14} {health.get('encryption')} keys={','.join(health.get('key_ids', [])) or '-'}")
    for warning in health.get("warnings", []):
        click.echo(f"warning: {warning}")
    if not health.get("ok"):
        sys.exit(os.EX_UNAVAILABLE)


@click.command("rotate-keys")
@click.option("--batch", type=int, default=200, show_default=True, help="Records read and re-encrypted per store round trip.")
@click.option(
    "--adopt-unsealed",
    is_flag=True,
    help="First seal records written by celery-persist 0.1 (no record seal yet); run once, right after upgrading.",
)
@click.pass_obj
def rotate_keys_cmd(ops: _Ops, batch: int, adopt_unsealed: bool) -> None:
    """Re-encrypt and re-seal every record under the active key (resumable, safe while workers run)."""
    with _errors():
        if adopt_unsealed:
            click.echo(f"adopted={ops.hub.adopt_unsealed(batch=batch)}")
        stats = ops.hub.stats()
        total = sum(stats["suspensions"].values()) + stats["checkpoints"] + stats["unreadable"]
        with click.progressbar(length=total, label="re-encrypting", file=sys.stderr) as bar:
            counts = ops.hub.rotate_keys(batch=batch, on_record=lambda _: bar.update(1))
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
    if counts["pending"]:
        click.echo("some records are not under the active key yet: run rotate-keys again before removing old keys", err=True)
        sys.exit(1)


@click.command("migrate")
@click.option("--rename", "renames", multiple=True, required=True, metavar="OLD=NEW", help="A task rename, repeatable.")
@click.pass_obj
def migrate_cmd(ops: _Ops, renames: tuple[str, ...]) -> None:
    """Rename tasks in every parked flow's continuation (after a deploy renamed them)."""
    aliases: dict[str, str] = {}
    for item in renames:
        old, sep, new = item.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"{item!r} is not OLD=NEW", param_hint="--rename")
        aliases[old] = new
    with _errors():
        changed = ops.hub.rewrite_states(lambda state: flow.rename_tasks(state, aliases))
    click.echo(f"migrated={changed}")


_SHARED: tuple[click.Command, ...] = (list_cmd, show_cmd, cancel_cmd, cleanup_cmd, stats_cmd, rotate_keys_cmd, migrate_cmd)


# -- `celery persist` ----------------------------------------------------------------------------------


@click.group("persist")
@click.pass_context
def persist(ctx: click.Context) -> None:
    """Inspect and operate celery-persist suspensions of the app (-A)."""
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("run it as `celery -A proj persist ...`")
    with _errors():
        binding = binding_of(app)
        ctx.obj = _Ops(binding.ready(), binding)


@click.command("resume")
@click.argument("key")
@click.option("--input", "input_json", metavar="JSON", help="The resume input, as JSON.")
@click.option("--input-file", type=click.Path(dir_okay=False, allow_dash=True), help="Read the JSON input from a file (- for stdin).")
@click.option("--null", "null", is_flag=True, help="Resume with null as the input.")
@click.option("--by", "by", metavar="NAME", help="Who approves (a suspension that waits for approvals).")
@click.pass_obj
def resume_cmd(ops: _Ops, key: str, input_json: str | None, input_file: str | None, null: bool, by: str | None) -> None:
    """Resume a parked flow with an input: one of --input, --input-file or --null.

    KEY must be the suspension key: a fingerprint does not resume.
    """
    if _HEX.fullmatch(key):
        raise click.UsageError("resume needs the suspension key itself; a fingerprint names a suspension but cannot resume it")
    value = _read_input(input_json, input_file, null)
    assert ops.binding is not None
    with _errors():
        # The input is checked against the suspension's schema here, before any claim.
        result = flow.resume(ops.binding, key, value, by=by)
    if result is None:
        click.echo(f"approval by {by} recorded; more approvals are needed")
    else:
        click.echo(f"resumed; continuation task id {result.id}")


for _cmd in (*_SHARED, resume_cmd, serve_command):
    persist.add_command(_cmd)


# -- standalone `celery-persist` ------------------------------------------------------------------------


def _option_pairs(values: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in values:
        name, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--store-option")
        try:
            out[name] = json.loads(raw)
        except ValueError:
            out[name] = raw
    return out


class _StoreOps(_Ops):
    """Ops over a store named on the command line, opened on first use (``demo`` needs none)."""

    def __init__(self, url: str | None, options: dict[str, Any]) -> None:
        self._url, self._options = url, options
        self._hub: PersistenceHub | None = None
        self.binding = None

    @property
    def hub(self) -> PersistenceHub:
        if self._hub is None:
            if not self._url:
                raise click.UsageError("name the store with --store URL (or CELERY_PERSIST_STORE_URL)")
            with _errors():
                store = open_store(self._url, **self._options)
                store.setup()
                # A SQLite store's own key file serves when no key is configured.
                self._hub = PersistenceHub(store, keyring=Keyring.from_env() or embedded_keyring(self._url, create=False))
        return self._hub

    def close(self) -> None:
        if self._hub is not None:
            self._hub.close()


@click.group("celery-persist")
@click.version_option(package_name="celery-persist")
@click.option("--store", "store_url", envvar="CELERY_PERSIST_STORE_URL", metavar="URL", help="Store URL for the store commands.")
@click.option("--store-option", multiple=True, metavar="NAME=VALUE", help="Store option, repeatable (e.g. prefix=shop).")
@click.pass_context
def main(ctx: click.Context, store_url: str | None, store_option: tuple[str, ...]) -> None:
    """celery-persist: durable, suspendable Celery work.

    `celery-persist demo` runs the embedded demo. The store commands (list,
    show, cancel, cleanup --dry-run, stats, rotate-keys) work on --store URL
    without a Celery app; keys come from CELERY_PERSIST_KEYS. Resuming needs
    the app: `celery -A proj persist resume KEY`.
    """
    ops = _StoreOps(store_url, _option_pairs(store_option))
    ctx.obj = ops
    ctx.call_on_close(ops.close)


for _cmd in _SHARED:
    main.add_command(_cmd)


@main.command("keygen")
@click.option("--id", "kid", metavar="KID", help="Key id (default: k<UTC date>, so newer keys sort later).")
def keygen_cmd(kid: str | None) -> None:
    """Print a new AES-256 key as a ready-to-use `export CELERY_PERSIST_KEYS=...` line.

    To rotate, put the new key first and keep the old ones after it
    (CELERY_PERSIST_KEYS=new,old), then run `rotate-keys`.
    """
    with _errors():
        click.echo(f"export CELERY_PERSIST_KEYS={new_key_line(kid)}")


@main.command("demo")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=".celery-persist-demo",
    show_default=True,
    help="Directory for the demo's store, key file and worker log.",
)
def demo_cmd(directory: str) -> None:
    """Park an approval flow, restart the worker, resume it: no server needed."""
    # The demo runs in its own interpreter: its module builds a Celery app and
    # registers the shared tasks, which a `celery` command must not do to every app.
    proc = subprocess.run([sys.executable, "-m", "celery_persist.demo", os.path.abspath(directory)], check=False)  # noqa: S603
    sys.exit(proc.returncode)
