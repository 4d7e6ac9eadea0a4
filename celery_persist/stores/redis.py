"""``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://``, ``redis+cluster://``: records in Redis.

URL:
    Anything ``redis.Redis.from_url`` accepts, passed to it unchanged:
    ``redis://[[user]:[password]@]host[:port][/db][?option=value...]``,
    ``rediss://...`` (TLS), ``unix://[[user]:[password]@]/path/to.sock[?db=N]``.
    Query options (``socket_timeout``, ``health_check_interval``,
    ``ssl_cert_reqs``...) are typed by redis-py and win over store options.

    Sentinel (this store's own form; redis-py has no URL for it)::

        redis+sentinel://[[user]:[password]@]host[:port][,host[:port]...]/service_name[/db][?option=value...]

    Hosts are the sentinels (default port 26379), ``service_name`` is the
    monitored master's name. ``user``/``password`` authenticate to the master;
    the query options ``sentinel_username`` / ``sentinel_password`` to the
    sentinels; other query options are typed as for ``redis://`` and apply to
    the master connections (``?ssl=true`` for TLS).

    Redis Cluster (this store's own form, for ``redis.cluster.RedisCluster``)::

        redis+cluster://[[user]:[password]@]host[:port][,host[:port]...][?option=value...]
        rediss+cluster://...                                  (TLS to every node)

    Hosts are cluster nodes (default port 6379), masters or replicas: any one
    that answers is enough to discover the rest, so name several. No ``/db``
    (a cluster has only database 0). Credentials and query options apply to
    every node and are typed as for ``redis://``. The equivalent
    ``redis://host:port`` with the option ``cluster=True`` names one node.

Options:
    ``prefix`` (default ``"celery-persist"``): namespace of every key; must not
    contain ``{`` or ``}``. ``cluster`` (default False): use
    ``redis.cluster.RedisCluster.from_url`` (``redis://`` / ``rediss://`` URLs
    naming any node). ``retries`` (default 8): reconnect attempts with
    exponential backoff and jitter (up to 100 ms doubling to 1 s) after a
    connection error or timeout, about 4 s in all (5.5 s at most), before
    :class:`StoreUnavailable`. redis-py counts a refused password as a
    connection error, so a wrong password also takes that long to report
    (as :class:`ConfigurationError`).
    ``socket_timeout`` (30 s) / ``socket_connect_timeout`` (5 s).
    ``wait_replicas`` (default 0) / ``wait_timeout`` (default 1 s): see
    Replication below; set ``wait_replicas`` to the number of replicas of
    each master to keep acknowledged writes through a failover.
    ``client_options``: extra keyword arguments for the redis-py client
    (``max_connections``, ``ssl_ca_certs``, ...); they override the above.
    Install ``redis[hiredis]``: replies are parsed by hiredis, while commands
    with a value over 64 KiB bypass its copying packer (see :mod:`.redis_conn`).

Layout (``P`` = prefix; every key carries the hash tag ``{P}``)::

    {P}:r:<key_hash>   hash: kind, status, meta (canonical JSON), created_at,
                       updated_at, expires_at, due_at (absent when None; floats
                       as ``repr`` strings, so float64 round-trips exactly),
                       version (decimal), seal (absent in records written before
                       they existed: read as 0 and ""), op
    {P}:b:<key_hash>   string: the blob (a key of its own: SET keeps the received
                       buffer where HSET copies it, and listings never touch it)
    {P}:due            sorted set, score due_at: the due index (absent when None)
    {P}:all            sorted set, score 0, of every key_hash: unfiltered listing
    {P}:ix             sorted set, score 0, of "<kind>:<status>:<key_hash>":
                       filtered listing, one ZRANGEBYLEX per (kind, status) range
    {P}:layout         layout version, written by setup()
    {P}:sync           "1", rewritten before each WAIT (only with wait_replicas)

Every key of one prefix lives in one cluster slot, so Lua scripts and MULTI
blocks may touch a record, its blob and the indexes together; one prefix is
therefore served by one shard (give applications different prefixes to spread
load). ``scan()`` reads index ranges in one MULTI, then re-checks each record's
kind and status, so a record that moved in between is skipped, never
duplicated; a filtered page costs O(page), however few records match.
``due()`` reads a page in one Lua script (the index range, then each record's
fields and blob, one snapshot, one reply): cleanup's cost per record is then
decoding, not a reply per command. The script builds record and blob keys from
the prefix it is given; they share the due index's hash tag, hence its node.

Atomicity:
    ``transition()`` is one Lua script (EVALSHA, re-sent with SCRIPT LOAD on
    NOSCRIPT): it checks ``status`` against ``expect`` (and ``version``
    against ``expect_version``) and sets status, updated_at, due_at, version,
    seal and both indexes in one step; Redis runs scripts one at
    a time, so exactly one concurrent caller wins. ``replace_blob()`` is a Lua
    script too. ``put()`` / ``put_many()`` send MULTI, one EVAL of a batch
    script (up to 250 records: hash, indexes, and blobs up to 64 KiB), a SET
    per larger blob, EXEC: readers see the old record or the new one, never a
    mix. (EVAL carries the script text because a NOSCRIPT inside MULTI would
    fail only that command while the SETs still ran.) ``put_many()`` sends
    chunks of 1,000 records or 32 MiB of blobs. ``delete()`` and ``quarantine()``
    (ZREM from the due index, HDEL ``due_at``) are one MULTI each.
    ``transition_many()`` is one Lua script per 1,000 records that runs
    ``transition()``'s compare-and-set for each (one round trip and one reply,
    each record still its own compare-and-set, sharing one token). ``delete_many()`` is one Lua script per 1,000
    records (each record's hash, blob and index entries, as ``delete()``). Each call
    names only the record's keys and its prefix's indexes, all under the prefix's
    hash tag, so in a cluster a batch goes to the one node that serves the prefix.

    redis-py re-sends a command after a connection error or timeout, even when
    the first attempt ran and only its reply was lost. ``put`` is idempotent.
    ``transition`` and ``replace_blob`` store a random token in the record's
    ``op`` field when they commit; a re-sent call finding its own token returns
    True again, so a lost reply neither loses a won claim nor lets a second
    caller win it. A re-sent ``delete`` reports False. A call that still fails
    raises :class:`StoreUnavailable`; its effect is then unknown (a claim made
    that way is a lease that cleanup re-opens).

Replication and failover: Redis replicates asynchronously. A master
acknowledges a write once it has it (and, under ``appendfsync always``, once
its AOF is fsynced), before any replica has it. A coordinated failover
(``CLUSTER FAILOVER``, ``SENTINEL FAILOVER``) waits for the replica to catch
up and loses nothing; a master that dies (``kill -9``, a crashed host) and is
replaced by its replica loses what had not reached the replica yet: an
acknowledged ``put`` is gone, and an acknowledged claim is undone, so another
worker can win the same record again. With ``wait_replicas=N`` every write
that changed something (a lost compare-and-set writes nothing) returns only
after ``WAIT N`` on the node that ran it confirms that N replicas have it;
unconfirmed, the write is re-sent (see above: safe) until confirmed or
``retries`` run out, then :class:`StoreUnavailable` (outcome unknown). A write
is then acknowledged only when a replica that can be promoted has it. With
more than one replica per master, set N to all of them: Redis promotes the
most up-to-date replica it can reach, not necessarily one that acknowledged.
It costs one round trip (and the replica's acknowledgement) per write; a
master with fewer than N replicas in sync refuses every write (after
``wait_timeout`` per attempt). On Sentinel, a failover between a write and its
WAIT can let the new master confirm it; a cluster never does (WAIT goes to the
node that owned the slot before the write, which refuses once it lost it).

Errors: messages name redis-py's cause (``ConnectionError: Error 111 connecting
to 127.0.0.1:6379. Connection refused.``), URLs and passwords masked. A URL query
option that redis-py would hand to a connection class that does not take it
(``sentinel_password`` on ``redis://``, ``ssl_*`` on a non-TLS URL) is found
when the store is opened and raised as :class:`ConfigurationError` by the first
operation (not by the constructor: an application opens its store when it
binds, before it reports anything), naming the option, never its value; a
cluster client drops unknown options itself. A hash that does not
decode is an :class:`IntegrityError` from ``get()`` and a poisoned placeholder
in ``scan()`` / ``due()``.

Fork: the client is created on first use and re-created when ``os.getpid()``
changes, with a fresh connection pool; a child never sends on its parent's
sockets nor shuts them down (it only drops its inherited descriptors).

Servers tested: Redis 7.0 standalone (TCP and unix socket), Sentinel, a
one-node Redis Cluster, and a 3-master cluster (the whole conformance suite;
with one replica each, a coordinated failover and a ``kill -9`` of the master
mid-race: ``tests/integration/test_redis_cluster_failover.py``), with redis-py
8.1 and hiredis 3.5. ``rediss://`` is redis-py's
TLS connection and was not run against a TLS server here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigurationError, PersistenceError, StoreUnavailable
from .base import (
    KEEP,
    BaseStore,
    Keep,
    Kind,
    Page,
    ScanRange,
    Status,
    StoredRecord,
    TransitionSpec,
    batches,
    decode_record,
    decoded,
    distinct_changes,
    dump_metadata,
    salvage,
)
from .drivers import describe, mask_url, require
from .redis_conn import SCHEMES, RedisTarget

__all__ = ["RedisStore"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Version of the key layout described above; setup() refuses a newer one.
LAYOUT = "1"

_CHUNK_RECORDS = 1000
_CHUNK_BYTES = 32 * 1024 * 1024
_SCRIPT_BATCH = 250
#: Blobs up to this size travel inside the put script; larger ones get their own SET.
_INLINE_BLOB = 64 * 1024
_ALL_PAIRS = tuple(f"{k.value}:{s.value}:" for k in Kind for s in Status)
#: redis-py's connection class refusing an option: ``... got an unexpected keyword argument 'name'``.
_UNEXPECTED_OPTION = re.compile(r"unexpected keyword argument '([A-Za-z_][A-Za-z0-9_]*)'")

# Batch upsert. KEYS: all, due, ix, then (record, blob) per record.
# ARGV, 12 per record: key_hash, kind, status, meta, created_at, updated_at,
# expires_at ('' = None), due_at ('' = None), version, seal, inline ('1' = blob follows), blob.
_PUT = """
local n = (#KEYS - 3) / 2
for i = 0, n - 1 do
  local a = i * 12
  local rec, kh, kind, status = KEYS[4 + 2 * i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local old = redis.call('HMGET', rec, 'kind', 'status')
  if old[1] and old[2] then
    redis.call('ZREM', KEYS[3], old[1] .. ':' .. old[2] .. ':' .. kh)
  end
  redis.call('DEL', rec)
  redis.call('HSET', rec, 'kind', kind, 'status', status, 'meta', ARGV[a + 4],
             'created_at', ARGV[a + 5], 'updated_at', ARGV[a + 6],
             'version', ARGV[a + 9], 'seal', ARGV[a + 10])
  if ARGV[a + 7] ~= '' then redis.call('HSET', rec, 'expires_at', ARGV[a + 7]) end
  if ARGV[a + 8] ~= '' then
    redis.call('HSET', rec, 'due_at', ARGV[a + 8])
    redis.call('ZADD', KEYS[2], ARGV[a + 8], kh)
  else
    redis.call('ZREM', KEYS[2], kh)
  end
  redis.call('ZADD', KEYS[1], 0, kh)
  redis.call('ZADD', KEYS[3], 0, kind .. ':' .. status .. ':' .. kh)
  if ARGV[a + 11] == '1' then redis.call('SET', KEYS[5 + 2 * i], ARGV[a + 12]) end
end
return n
"""

# Batch delete. KEYS: all, due, ix, then (record, blob) per record; ARGV: key_hash per record.
# Reads each record's kind and status to remove its one listing entry; a hash whose pair is
# not a known one (edited outside the store) has every possible entry removed instead.
_DELETE_MANY = """
local entries = {PAIRS}
local known = {}
for _, p in ipairs(entries) do known[p] = true end
local n = 0
for i = 1, #ARGV do
  local rec, kh = KEYS[2 + 2 * i], ARGV[i]
  local cur = redis.call('HMGET', rec, 'kind', 'status')
  n = n + redis.call('DEL', rec)
  redis.call('DEL', KEYS[3 + 2 * i])
  local pair = (cur[1] or '') .. ':' .. (cur[2] or '') .. ':'
  if known[pair] then
    redis.call('ZREM', KEYS[3], pair .. kh)
  else
    local all = {}
    for j, p in ipairs(entries) do all[j] = p .. kh end
    redis.call('ZREM', KEYS[3], unpack(all))
  end
end
redis.call('ZREM', KEYS[1], unpack(ARGV))
redis.call('ZREM', KEYS[2], unpack(ARGV))
return n
""".replace("PAIRS", ", ".join(f"'{pair}'" for pair in _ALL_PAIRS))

# One page of due records, read in one snapshot. KEYS: due. ARGV: now, offset, count,
# record key prefix, blob key prefix. Returns, per index entry: key_hash, score, the
# _DUE_FIELDS of its hash (nil where absent) and its blob (nil where absent). The record
# and blob keys carry the store's hash tag, so on a cluster they live on the due index's node.
_DUE_PAGE = """
local ks = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', ARGV[2], ARGV[3])
local out = {}
for i = 1, #ks, 2 do
  local kh = ks[i]
  out[#out + 1] = kh
  out[#out + 1] = ks[i + 1]
  out[#out + 1] = redis.call('HMGET', ARGV[4] .. kh, FIELDS)
  out[#out + 1] = redis.call('GET', ARGV[5] .. kh)
end
return out
"""
_DUE_FIELDS = ("kind", "status", "meta", "created_at", "expires_at", "due_at", "updated_at", "version", "seal")
_DUE_PAGE = _DUE_PAGE.replace("FIELDS", ", ".join(f"'{f}'" for f in _DUE_FIELDS))
_DUE_KEYS = tuple(f.encode() for f in _DUE_FIELDS)

# Compare-and-set on status (and version). KEYS: record, due, ix.
# ARGV: key_hash, to, due mode (k = keep, n = none, s = set), due_at, now, token,
# new version ('' = keep), seal mode (k = keep, s = set), seal, expected version ('' = any), expect...
# The token check comes first: a re-sent call whose first attempt won (and so moved
# the version on) must answer 1 again, not fail its own version check.
_TRANSITION = """
local cur = redis.call('HMGET', KEYS[1], 'kind', 'status', 'op', 'version')
if not cur[2] then return 0 end
if cur[3] == ARGV[6] then return 1 end
if ARGV[10] ~= '' and (cur[4] or '0') ~= ARGV[10] then return 0 end
local allowed = false
for i = 11, #ARGV do
  if ARGV[i] == cur[2] then allowed = true break end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'updated_at', ARGV[5], 'op', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'version', ARGV[7]) end
if ARGV[8] == 's' then redis.call('HSET', KEYS[1], 'seal', ARGV[9]) end
if ARGV[3] == 's' then
  redis.call('HSET', KEYS[1], 'due_at', ARGV[4])
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
elseif ARGV[3] == 'n' then
  redis.call('HDEL', KEYS[1], 'due_at')
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if cur[2] ~= ARGV[2] then
  redis.call('ZREM', KEYS[3], cur[1] .. ':' .. cur[2] .. ':' .. ARGV[1])
  redis.call('ZADD', KEYS[3], 0, cur[1] .. ':' .. ARGV[2] .. ':' .. ARGV[1])
end
return 1
"""

# _TRANSITION for many records in one script, each record still its own compare-and-set.
# KEYS: due, ix, then the record of each change. ARGV: now, token, then per change:
# key_hash, to, due mode, due_at, new version, seal mode, seal, expected version ('' = any),
# the number of expected statuses, those statuses. Returns 1 (moved) or 0 per change.
_TRANSITION_MANY = """
local now, token = ARGV[1], ARGV[2]
local out = {}
local a = 3
for r = 3, #KEYS do
  local rec = KEYS[r]
  local kh, to, mode, due = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local ver, smode, seal, ev = ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local n = tonumber(ARGV[a + 8])
  local won = 0
  local cur = redis.call('HMGET', rec, 'kind', 'status', 'op', 'version')
  if cur[2] then
    if cur[3] == token then
      won = 1
    elseif ev == '' or (cur[4] or '0') == ev then
      for i = 0, n - 1 do
        if ARGV[a + 9 + i] == cur[2] then won = 2 break end
      end
    end
  end
  if won == 2 then
    redis.call('HSET', rec, 'status', to, 'updated_at', now, 'op', token)
    if ver ~= '' then redis.call('HSET', rec, 'version', ver) end
    if smode == 's' then redis.call('HSET', rec, 'seal', seal) end
    if mode == 's' then
      redis.call('HSET', rec, 'due_at', due)
      redis.call('ZADD', KEYS[1], due, kh)
    elseif mode == 'n' then
      redis.call('HDEL', rec, 'due_at')
      redis.call('ZREM', KEYS[1], kh)
    end
    if cur[2] ~= to then
      redis.call('ZREM', KEYS[2], cur[1] .. ':' .. cur[2] .. ':' .. kh)
      redis.call('ZADD', KEYS[2], 0, cur[1] .. ':' .. to .. ':' .. kh)
    end
    won = 1
  end
  out[#out + 1] = won
  a = a + 9 + n
end
return out
"""

# Swap the blob if unchanged. KEYS: record, blob.
# ARGV: old, new, now, token, new version ('' = keep), seal mode (k = keep, s = set), seal.
_REPLACE_BLOB = """
local cur = redis.call('HMGET', KEYS[1], 'status', 'op')
if not cur[1] then return 0 end
if cur[2] == ARGV[4] then return 1 end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'op', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'version', ARGV[5]) end
if ARGV[6] == 's' then redis.call('HSET', KEYS[1], 'seal', ARGV[7]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class _Conn:
    """A client and its scripts, valid only in the process that made them."""

    client: Any
    pid: int
    transition: Any
    replace_blob: Any


def _transition_argv(change: TransitionSpec, now: float, token: str) -> list[str]:
    """The transition script's ARGV for ``change`` (the order :meth:`RedisStore.transition` sends)."""
    if isinstance(change.due_at, Keep):
        mode, due = "k", ""
    elif change.due_at is None:
        mode, due = "n", ""
    else:
        mode, due = "s", repr(float(change.due_at))
    return [
        change.key_hash,
        change.to.value,
        mode,
        due,
        repr(float(now)),
        token,
        *_token_args(change.version, change.seal),
        "" if change.expect_version is None else str(int(change.expect_version)),
        *sorted(s.value for s in change.expect),
    ]


def _token_args(version: int | None, seal: str | None) -> tuple[str, str, str]:
    """The scripts' (new version, seal mode, seal) arguments; '' and 'k' leave them unchanged."""
    return ("" if version is None else str(int(version)), "k" if seal is None else "s", seal or "")


class RedisStore(BaseStore):
    """Records in Redis: a hash and a blob key per record, sorted sets as indexes.

    Nothing connects here; the first operation does (see the module docstring
    for layout, atomicity, retries and fork behaviour).

    Args:
        url: ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or ``redis+cluster://`` URL.
        prefix: Namespace (and cluster hash tag) of every key.
        cluster: Talk to a Redis Cluster through ``RedisCluster.from_url``.
        retries: Reconnect attempts after a connection error or timeout.
        socket_timeout: Seconds to wait for a reply (URL query options win).
        socket_connect_timeout: Seconds to wait for a connection.
        client_options: Extra keyword arguments for the redis-py client.
        wait_replicas: Replicas that must confirm each write before it returns (0: none).
        wait_timeout: Seconds each confirmation may wait for them.

    Raises:
        ConfigurationError: redis-py is missing, or the URL or an option is invalid.

    Example:
        >>> store = open_store("redis://127.0.0.1:6379/2", prefix="shop")  # doctest: +SKIP
        >>> store.health()["warnings"]  # doctest: +SKIP
        ["persistence is off (no RDB save points and appendonly no): ..."]
    """

    schemes: ClassVar[tuple[str, ...]] = SCHEMES

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "celery-persist",
        cluster: bool = False,
        retries: int = 8,
        socket_timeout: float | None = 30.0,
        socket_connect_timeout: float | None = 5.0,
        client_options: Mapping[str, Any] | None = None,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.name = mask_url(url)
        self._redis = require("redis", extra="redis", store="redis")
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"Redis prefix {prefix!r} must be non-empty and free of '{{' and '}}' (it becomes the hash tag)",
                store=self.name,
            )
        if not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be an integer >= 0, not {retries!r}", store=self.name)
        if not isinstance(wait_replicas, int) or isinstance(wait_replicas, bool) or wait_replicas < 0:
            raise ConfigurationError(f"wait_replicas must be an integer >= 0, not {wait_replicas!r}", store=self.name)
        if not isinstance(wait_timeout, int | float) or not wait_timeout > 0:
            raise ConfigurationError(f"wait_timeout must be a number of seconds > 0, not {wait_timeout!r}", store=self.name)
        self._target = RedisTarget.parse(
            url,
            self._redis,
            cluster=cluster,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            client_options=client_options,
        )
        self._retries = retries
        self._wait_replicas = wait_replicas
        self._wait_ms = max(1, round(wait_timeout * 1000))
        self._prefix = prefix
        tag = "{" + prefix + "}"
        self._k_rec = f"{tag}:r:"
        self._k_blob = f"{tag}:b:"
        self._k_all = f"{tag}:all"
        self._k_due = f"{tag}:due"
        self._k_ix = f"{tag}:ix"
        self._k_layout = f"{tag}:layout"
        self._k_sync = f"{tag}:sync"
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._conn: _Conn | None = None

    # -- connection ---------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The key namespace; every key of this store starts with ``{prefix}:``."""
        return self._prefix

    @property
    def mode(self) -> str:
        """``"standalone"``, ``"cluster"`` or ``"sentinel"``."""
        return self._target.mode

    def _connection(self) -> _Conn:
        pid = os.getpid()
        conn = self._conn
        if conn is not None and conn.pid == pid:
            return conn
        if self._owner_pid != pid:
            # A forked child: the parent's lock may have been held by a thread
            # that does not exist here, and its sockets belong to the parent.
            # Dropping the client is safe: redis-py only closes (never shuts
            # down) sockets created under another pid.
            self._lock = threading.Lock()
            self._conn = None
            self._owner_pid = pid
        with self._lock:
            if self._conn is None or self._conn.pid != pid:
                client = self._target.connect(self._redis, self._retries)
                log.debug("redis store %s: new %s client in pid %d", self.name, self.mode, pid)
                self._conn = _Conn(
                    client,
                    pid,
                    client.register_script(_TRANSITION),
                    client.register_script(_REPLACE_BLOB),
                )
            return self._conn

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Map redis-py's exceptions onto the celery-persist error tree; messages name the cause, masked."""
        exc = self._redis.exceptions
        try:
            yield
        except exc.RedisError as err:
            if isinstance(err, exc.ResponseError):
                # A pipeline error quotes the failing command and its first
                # arguments, which can be blob or metadata bytes: keep only the
                # server's words, in our message and in the chained exception.
                err.args = (str(err).partition("caused error: ")[2] or str(err),)
            raise self._translate(err) from err
        except exc.RedisClusterException as err:
            if "cluster mode" in str(err).lower():
                raise ConfigurationError(f"Redis Cluster ({self._describe(err)})", store=self.name) from err
            raise StoreUnavailable(f"Redis Cluster is unreachable ({self._describe(err)})", store=self.name) from err
        except OSError as err:
            raise StoreUnavailable(f"Redis is unreachable ({self._describe(err)}); retry later", store=self.name) from err
        except TypeError as err:
            # redis-py hands options it does not know to the connection class, which
            # refuses them on the first command; RedisTarget checks the URL's options
            # up front, this catches the ones that came another way (client_options).
            unexpected = _UNEXPECTED_OPTION.search(str(err))
            if unexpected is None:
                raise
            raise ConfigurationError(
                f"redis-py does not take the option {unexpected[1]!r}: remove it from the store URL or client_options",
                store=self.name,
            ) from err

    def _describe(self, err: BaseException) -> str:
        return describe(err, url=self._target.url)

    def _translate(self, err: Exception) -> PersistenceError:
        exc = self._redis.exceptions
        message = str(err)
        cause = self._describe(err)
        refused = (exc.AuthenticationError, exc.AuthorizationError, exc.AuthenticationWrongNumberOfArgsError)
        if isinstance(err, (*refused, exc.NoPermissionError)):
            return ConfigurationError(
                f"Redis refused the credentials or ACL permissions ({cause}): "
                "check the user and password in the store URL and the user's ACL",
                store=self.name,
            )
        if isinstance(err, exc.OutOfMemoryError):
            return StoreUnavailable(
                f"Redis is out of memory (maxmemory reached) and refuses writes ({cause}): free memory or raise maxmemory",
                store=self.name,
            )
        # ReadOnlyError: a write reached a replica during a failover. AskError (and its
        # subclass MovedError): a cluster slot changed hands, and redis-py gave up following
        # it (a MULTI pipeline raises the last MOVED once its retries are spent); transient.
        transient = (exc.ConnectionError, exc.TimeoutError, exc.ClusterError, exc.TryAgainError, exc.ReadOnlyError, exc.AskError)
        if isinstance(err, transient):
            return StoreUnavailable(
                f"Redis is unreachable or not accepting commands ({cause}); retry later",
                store=self.name,
            )
        if isinstance(err, exc.ResponseError):
            if "WRONGTYPE" in message:
                return ConfigurationError(
                    f"a Redis key under the prefix {self._prefix!r} holds another type of value: "
                    "something else writes under this prefix; choose another prefix",
                    store=self.name,
                )
            if message.startswith(("MISCONF", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")):
                return StoreUnavailable(f"Redis refuses commands for now ({cause})", store=self.name)
            return PersistenceError(f"Redis rejected a command ({cause})", store=self.name)
        return PersistenceError(f"Redis client error ({cause})", store=self.name)

    # -- replication (wait_replicas) ------------------------------------------

    def _replicated(self, write: Callable[[], _T], wrote: Callable[[_T], bool] = lambda _: True) -> _T:
        """Run ``write``; with ``wait_replicas``, return only once that many replicas have it.

        Redis replicates asynchronously: a master acknowledges a write (after its own
        fsync under ``appendfsync always``) before any replica has it, and a replica
        promoted after the master dies lacks it. A claim acknowledged that way can be
        lost and won a second time, a put lost. So, when ``wrote(result)`` (the call
        changed something), WAIT for the replicas, on the node that ran the write: that
        node (the master of this prefix's slot in a cluster) is chosen *before* the
        write, so a write that a failover sent elsewhere is never confirmed by
        another master's replicas.

        WAIT covers the writes made on its own connection, and the write went through
        the client's pool (or a cluster's redirections), so the confirming connection
        first writes ``{P}:sync`` itself: replication is in order, so the replicas
        that have that write have ours. Not confirmed (too few replicas answered within
        ``wait_timeout``, the node is gone or no longer a master): the write is sent
        again, which is safe as for redis-py's own re-sends (``put`` is idempotent,
        ``transition`` / ``replace_blob`` keep their token, so a re-sent claim that
        survived the failover answers True again and one that was lost is decided
        afresh on the new master), up to ``retries`` times with backoff; then
        :class:`StoreUnavailable`, the write's fate unknown.
        """
        if not self._wait_replicas:
            return write()
        missing = ""
        for attempt in range(self._retries + 1):
            if attempt:
                time.sleep(min(1.0, 0.05 * 2 ** (attempt - 1)) * (0.5 + secrets.randbelow(1000) / 2000))
            with self._errors():
                node = self._write_node()
            result = write()
            if not wrote(result):
                return result
            missing = self._confirm(node)
            if not missing:
                return result
            log.warning("redis store %s: write not confirmed by %d replica(s): %s", self.name, self._wait_replicas, missing)
        raise StoreUnavailable(
            f"a write was not confirmed by {self._wait_replicas} replica(s) after {self._retries + 1} attempts "
            f"({missing}); it may or may not have been applied",
            store=self.name,
        )

    def _write_node(self) -> Any:
        """A client of the one server that serves this prefix's writes now."""
        client = self._connection().client
        if self._target.cluster:
            # The node's own client: no redirection, so a node that lost its slot refuses (MOVED).
            return client.get_redis_connection(client.get_node_from_key(self._k_all))
        return client

    def _confirm(self, node: Any) -> str:
        """'' when ``wait_replicas`` replicas of ``node`` have everything written there so far, else why not."""
        try:
            pipe = node.pipeline(transaction=False)
            pipe.execute_command("SET", self._k_sync, b"1")
            pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
            acked = int(pipe.execute()[1])
        except (self._redis.exceptions.RedisError, OSError) as err:
            return self._describe(err)
        if acked < self._wait_replicas:
            return f"{acked} replica(s) acknowledged within {self._wait_ms} ms"
        return ""

    # -- store contract -----------------------------------------------------

    def setup(self) -> None:
        """Record the layout version (idempotent); refuse a newer layout or foreign keys.

        Raises:
            ConfigurationError: The prefix holds a newer layout, or an index key
                holds another type of value (something else writes there).
        """
        with self._errors():
            client = self._connection().client
            client.set(self._k_layout, LAYOUT, nx=True)
            pipe = client.pipeline(transaction=False)
            pipe.get(self._k_layout)
            for key in (self._k_all, self._k_due, self._k_ix):
                pipe.type(key)
            found, *types = pipe.execute()
        if any(t not in (b"zset", b"none") for t in types):
            raise ConfigurationError(
                f"a Redis index key under the prefix {self._prefix!r} is not a sorted set: "
                "something else writes under this prefix; choose another prefix",
                store=self.name,
            )
        if found is not None and found.decode() != LAYOUT:
            raise ConfigurationError(
                f"prefix {self._prefix!r} holds Redis store layout {found.decode()!r}; this release writes "
                f"{LAYOUT!r}: upgrade celery-persist or use another prefix",
                store=self.name,
            )

    def put(self, record: StoredRecord) -> None:
        self._write([record])

    def put_many(self, records: Iterable[StoredRecord]) -> None:
        """Upsert in MULTI blocks of up to 1,000 records or 32 MiB of blobs.

        Each block is atomic and runs without other clients' commands in
        between, which is why blocks stay this small.
        """
        for batch in batches(records, max_records=_CHUNK_RECORDS, max_bytes=_CHUNK_BYTES):
            self._write(batch)

    def _write(self, records: Sequence[StoredRecord]) -> None:
        # Last write of a key wins, as if put one by one; a duplicate would also
        # let an earlier record's out-of-script SET land after a later inline blob.
        unique = list({r.key_hash: r for r in records}.values())
        self._replicated(lambda: self._write_once(unique))

    def _write_once(self, unique: Sequence[StoredRecord]) -> None:
        with self._errors():
            pipe = self._connection().client.pipeline(transaction=True)
            for start in range(0, len(unique), _SCRIPT_BATCH):
                part = unique[start : start + _SCRIPT_BATCH]
                keys: list[str] = [self._k_all, self._k_due, self._k_ix]
                args: list[str | bytes] = []
                large: list[StoredRecord] = []
                for rec in part:
                    kh = rec.key_hash
                    keys += (self._k_rec + kh, self._k_blob + kh)
                    inline = len(rec.blob) <= _INLINE_BLOB
                    args += (
                        kh,
                        Kind(rec.kind).value,
                        Status(rec.status).value,
                        dump_metadata(rec.metadata),
                        repr(float(rec.created_at)),
                        repr(float(rec.updated_at)),
                        "" if rec.expires_at is None else repr(float(rec.expires_at)),
                        "" if rec.due_at is None else repr(float(rec.due_at)),
                        str(int(rec.version)),
                        rec.seal,
                        "1" if inline else "0",
                        rec.blob if inline else "",
                    )
                    if not inline:
                        large.append(rec)
                pipe.execute_command("EVAL", _PUT, len(keys), *keys, *args)
                for rec in large:
                    pipe.execute_command("SET", self._k_blob + rec.key_hash, rec.blob)
            pipe.execute()

    def get(self, key_hash: str) -> StoredRecord | None:
        with self._errors():
            found = self._fetch(self._connection().client, [key_hash], with_blob=True)[0]
        return None if found is None else decoded(found, store=self.name)

    def delete(self, key_hash: str) -> bool:
        return self._replicated(lambda: self._delete_once(key_hash))

    def _delete_once(self, key_hash: str) -> bool:
        with self._errors():
            pipe = self._connection().client.pipeline(transaction=True)
            pipe.execute_command("DEL", self._k_rec + key_hash)
            pipe.execute_command("DEL", self._k_blob + key_hash)
            pipe.execute_command("ZREM", self._k_all, key_hash)
            pipe.execute_command("ZREM", self._k_due, key_hash)
            # Every (kind, status) entry it could have: no read needed inside MULTI.
            pipe.execute_command("ZREM", self._k_ix, *(pair + key_hash for pair in _ALL_PAIRS))
            removed = pipe.execute()[0]
        return bool(removed)

    def transition(
        self,
        key_hash: str,
        expect: Collection[Status],
        to: Status,
        *,
        due_at: float | None | Keep = KEEP,
        now: float,
        version: int | None = None,
        seal: str | None = None,
        expect_version: int | None = None,
    ) -> bool:
        if not expect:
            return False
        if due_at is KEEP:
            mode, due = "k", ""
        elif due_at is None:
            mode, due = "n", ""
        else:
            mode, due = "s", repr(float(due_at))
        # The token makes a re-sent call (reply lost, redis-py retried) answer like the first.
        token = secrets.token_hex(8)
        args = [
            key_hash,
            Status(to).value,
            mode,
            due,
            repr(float(now)),
            token,
            *_token_args(version, seal),
            "" if expect_version is None else str(int(expect_version)),
            *(Status(s).value for s in expect),
        ]

        def attempt() -> bool:
            with self._errors():
                conn = self._connection()
                return bool(conn.transition(keys=[self._k_rec + key_hash, self._k_due, self._k_ix], args=args) == 1)

        # A lost compare-and-set wrote nothing: only a win waits for the replicas.
        return self._replicated(attempt, wrote=bool)

    # -- batches (cleanup, resume_many) ----------------------------------------

    def transition_many(self, changes: Sequence[TransitionSpec], *, now: float) -> list[str]:
        """:meth:`transition`'s compare-and-set for each change, in one script per 1,000 records."""
        ordered = distinct_changes(changes)
        wanted = [c for c in ordered if c.expect]
        # One token for the call, as transition() has one: a re-sent script answers like the first.
        token = secrets.token_hex(8)
        moved: set[str] = set()
        for start in range(0, len(wanted), _CHUNK_RECORDS):
            moved.update(self._transition_part(wanted[start : start + _CHUNK_RECORDS], now, token))
        return [c.key_hash for c in ordered if c.key_hash in moved]

    def _transition_part(self, part: Sequence[TransitionSpec], now: float, token: str) -> list[str]:
        keys = [self._k_due, self._k_ix, *(self._k_rec + c.key_hash for c in part)]
        args: list[str] = [repr(float(now)), token]
        for c in part:
            argv = _transition_argv(c, now, token)
            # _transition_argv's order, less its now and token, with the expected statuses counted.
            args += (*argv[0:4], *argv[6:10], str(len(argv) - 10), *argv[10:])

        def attempt() -> list[bool]:
            with self._errors():
                # EVAL with the text, as delete_many's: one reply for the batch, never NOSCRIPT.
                replies = self._connection().client.execute_command("EVAL", _TRANSITION_MANY, len(keys), *keys, *args)
            return [int(reply) == 1 for reply in replies]

        # Only a batch that moved something waits for the replicas.
        won = self._replicated(attempt, wrote=any)
        return [c.key_hash for c, w in zip(part, won, strict=True) if w]

    def delete_many(self, key_hashes: Sequence[str]) -> int:
        keys = list(dict.fromkeys(key_hashes))
        return sum(self._delete_part(keys[start : start + _CHUNK_RECORDS]) for start in range(0, len(keys), _CHUNK_RECORDS))

    def _delete_part(self, part: Sequence[str]) -> int:
        return self._replicated(lambda: self._delete_many_once(part))

    def _delete_many_once(self, part: Sequence[str]) -> int:
        keys = [self._k_all, self._k_due, self._k_ix]
        for kh in part:
            keys += (self._k_rec + kh, self._k_blob + kh)
        with self._errors():
            # EVAL with the text, as put_many's: small next to the keys, and never NOSCRIPT.
            return int(self._connection().client.execute_command("EVAL", _DELETE_MANY, len(keys), *keys, *part))

    def replace_blob(
        self,
        key_hash: str,
        old_blob: bytes,
        new_blob: bytes,
        *,
        now: float,
        version: int | None = None,
        seal: str | None = None,
    ) -> bool:
        token = secrets.token_hex(8)

        def attempt() -> bool:
            with self._errors():
                conn = self._connection()
                swapped = conn.replace_blob(
                    keys=[self._k_rec + key_hash, self._k_blob + key_hash],
                    args=[old_blob, new_blob, repr(float(now)), token, *_token_args(version, seal)],
                )
            return bool(swapped == 1)

        return self._replicated(attempt, wrote=bool)

    def scan(
        self,
        *,
        kind: Kind | None = None,
        status: Status | None = None,
        limit: int = 100,
        cursor: str | None = None,
        with_blob: bool = False,
    ) -> Page:
        wanted = ScanRange(
            kind=None if kind is None else Kind(kind),
            status=None if status is None else Status(status),
            limit=max(1, int(limit)),
            cursor=cursor,
        )
        ranges = self._index_ranges(wanted.kind, wanted.status)
        items: list[StoredRecord] = []
        last = cursor
        with self._errors():
            client = self._connection().client
            while len(items) < wanted.limit:
                need = wanted.limit - len(items)
                keys = self._index_page(client, ranges, last, need)
                if not keys:
                    break
                for rec in self._fetch(client, keys, with_blob=with_blob):
                    if rec is None:
                        continue  # deleted after the index read
                    if wanted.matches(rec):
                        items.append(rec)
                last = keys[-1]
                if len(keys) < need:
                    break
            more = False
            if len(items) >= wanted.limit and last is not None:
                # Like the reference store: a full page has a next cursor while any
                # record at all follows, even if none of them matches the filter.
                more = bool(client.zrangebylex(self._k_all, "(" + last, "+", start=0, num=1))
        return Page(items, last if more else None)

    def _index_ranges(self, kind: Kind | None, status: Status | None) -> list[tuple[str, str]]:
        """(sorted set, member prefix) pairs whose members are the wanted records, in key order each."""
        if kind is None and status is None:
            return [(self._k_all, "")]
        kinds = list(Kind) if kind is None else [kind]
        statuses = list(Status) if status is None else [status]
        return [(self._k_ix, f"{k.value}:{s.value}:") for k in kinds for s in statuses]

    def _index_page(self, client: Any, ranges: Sequence[tuple[str, str]], after: str | None, need: int) -> list[str]:
        pipe = client.pipeline(transaction=len(ranges) > 1)
        for key, prefix in ranges:
            if prefix:
                low = ("(" + prefix + after) if after is not None else ("[" + prefix)
                # ';' follows ':' in ASCII, so this bounds exactly the members under prefix.
                high = "(" + prefix[:-1] + ";"
            else:
                low = ("(" + after) if after is not None else "-"
                high = "+"
            pipe.zrangebylex(key, low, high, start=0, num=need)
        found: set[str] = set()
        for (_, prefix), members in zip(ranges, pipe.execute(), strict=True):
            found.update(m.decode()[len(prefix) :] for m in members)
        return sorted(found)[:need]

    def _fetch(self, client: Any, keys: Sequence[str], *, with_blob: bool) -> list[StoredRecord | None]:
        # MULTI only when a hash and its blob must come from one snapshot.
        pipe = client.pipeline(transaction=with_blob)
        for kh in keys:
            pipe.hgetall(self._k_rec + kh)
            if with_blob:
                pipe.get(self._k_blob + kh)
        replies = pipe.execute()
        step = 2 if with_blob else 1
        out: list[StoredRecord | None] = []
        for i, kh in enumerate(keys):
            fields = replies[i * step]
            blob = replies[i * step + 1] if with_blob else b""
            out.append(self._decode(kh, fields, blob) if fields else None)
        return out

    @staticmethod
    def _decode(key_hash: str, fields: Mapping[bytes, bytes], blob: bytes | None) -> StoredRecord:
        """The record of a hash, or its poisoned placeholder when the hash does not decode."""
        return salvage(
            key_hash,
            lambda: decode_record(
                key_hash,
                kind=fields.get(b"kind"),
                status=fields.get(b"status"),
                blob=blob,
                metadata=fields.get(b"meta"),
                created_at=fields.get(b"created_at"),
                expires_at=fields.get(b"expires_at"),
                due_at=fields.get(b"due_at"),
                updated_at=fields.get(b"updated_at"),
                version=fields.get(b"version"),
                seal=fields.get(b"seal"),
            ),
        )

    def due(self, now: float, limit: int = 100) -> list[StoredRecord]:
        if limit <= 0:
            return []
        found: list[tuple[float, StoredRecord]] = []
        seen: set[str] = set()
        offset = 0
        with self._errors():
            client = self._connection().client
            while len(found) < limit:
                want = limit - len(found)
                # One script per page (index entries, hashes and blobs in one snapshot): one
                # reply to parse instead of two per record (cleanup prunes ~27 % faster, SCALE.md).
                raw = client.execute_command("EVAL", _DUE_PAGE, 1, self._k_due, repr(float(now)), offset, want, self._k_rec, self._k_blob)
                scores: dict[str, float] = {}
                for i in range(0, len(raw), 4):
                    kh = raw[i].decode()
                    scores[kh] = float(raw[i + 1])
                    values = raw[i + 2]
                    if all(v is None for v in values):
                        continue  # the hash went between the index read and now
                    fields = {name: v for name, v in zip(_DUE_KEYS, values, strict=True) if v is not None}
                    rec = self._decode(kh, fields, raw[i + 3])
                    if rec.key_hash in seen:
                        continue
                    # Re-checked: the record may have moved or gone since the index read. A
                    # poisoned one has no due_at to check: the index says it is due.
                    if rec.poisoned is None and (rec.due_at is None or rec.due_at > now):
                        continue
                    seen.add(rec.key_hash)
                    found.append((scores[rec.key_hash] if rec.due_at is None else rec.due_at, rec))
                if len(raw) < 4 * want:
                    break
                offset += len(raw) // 4
        found.sort(key=lambda pair: (pair[0], pair[1].key_hash))
        return [rec for _, rec in found]

    def quarantine(self, key_hash: str) -> bool:
        """One MULTI: ZREM from the due index and HDEL ``due_at``; the hash is never read."""
        return self._replicated(lambda: self._quarantine_once(key_hash))

    def _quarantine_once(self, key_hash: str) -> bool:
        with self._errors():
            pipe = self._connection().client.pipeline(transaction=True)
            pipe.execute_command("EXISTS", self._k_rec + key_hash)
            pipe.execute_command("ZREM", self._k_due, key_hash)
            pipe.execute_command("HDEL", self._k_rec + key_hash, "due_at")
            existed = pipe.execute()[0]
        return bool(existed)

    def health(self) -> dict[str, Any]:
        """``ok``, server version, record count, latency and warnings about durability.

        Warns when ``maxmemory-policy`` is not ``noeviction`` (Redis may evict
        records) and when persistence is off (no RDB save points and
        ``appendonly no``: a restart loses every record).
        """
        report: dict[str, Any] = {"ok": False, "store": self.name, "prefix": self._prefix, "mode": self.mode}
        try:
            with self._errors():
                client = self._connection().client
                started = time.perf_counter()
                client.ping()
                report["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
                info = self._node_info(client)
                report["records"] = int(client.zcard(self._k_all))
                save = self._node_config(client, "save")
        except PersistenceError as err:
            report["error"] = f"{type(err).__name__}: {err.message}"
            return report
        except Exception as err:  # noqa: BLE001 - health reports, it does not raise
            report["error"] = type(err).__name__
            return report
        report.update(
            ok=True,
            server_version=str(info.get("redis_version", "unknown")),
            maxmemory_policy=str(info.get("maxmemory_policy", "unknown")),
            appendonly=str(info.get("aof_enabled", "0")) == "1",
            save=save,
            warnings=_durability_warnings(info, save),
        )
        return report

    def _node_info(self, client: Any) -> dict[str, Any]:
        info: dict[str, Any] = {}
        for section in ("server", "persistence", "memory"):
            if self._target.cluster:
                node = client.get_node_from_key(self._k_all)
                info.update(client.info(section, target_nodes=node))
            else:
                info.update(client.info(section))
        return info

    def _node_config(self, client: Any, name: str) -> str | None:
        try:
            if self._target.cluster:
                node = client.get_node_from_key(self._k_all)
                values = client.config_get(name, target_nodes=node)
            else:
                values = client.config_get(name)
        except self._redis.exceptions.ResponseError:
            # Managed services often rename or forbid CONFIG.
            return None
        value = values.get(name) if isinstance(values, dict) else None
        if isinstance(value, bytes):
            value = value.decode()
        return None if value is None else str(value)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.pid == os.getpid():
            with contextlib.suppress(Exception):
                conn.client.close()
            if self._target.cluster:
                # RedisCluster.close() closes its node clients, but a node client built around
                # a pool (as from_url builds them) leaves that pool's sockets open until GC.
                with contextlib.suppress(Exception):
                    for node in conn.client.get_nodes():
                        if node.redis_connection is not None:
                            node.redis_connection.connection_pool.disconnect()


def _durability_warnings(info: Mapping[str, Any], save: str | None) -> list[str]:
    """What in INFO and ``CONFIG GET save`` (None: refused) may lose records."""
    warnings: list[str] = []
    policy = str(info.get("maxmemory_policy", "unknown"))
    if policy != "noeviction":
        warnings.append(f"maxmemory-policy is {policy!r}: Redis may evict records under memory pressure; set maxmemory-policy noeviction")
    aof = str(info.get("aof_enabled", "0")) == "1"
    if save is None:
        if not aof:
            warnings.append("appendonly is off and CONFIG GET save was refused: check that RDB snapshots run")
    elif not aof and not save.strip():
        warnings.append(
            "persistence is off (no RDB save points and appendonly no): a Redis restart loses every record; enable appendonly yes"
        )
    for field in ("rdb_last_bgsave_status", "aof_last_write_status"):
        if str(info.get(field, "ok")) != "ok":
            warnings.append(f"{field} is {info[field]!r}: Redis is failing to persist data")
    return warnings
