"""The raw floor: the best plain pipeline a user could write without celery-persist.

A floor is ``serialize -> compress -> AES-256-GCM -> raw driver write`` and back,
with nothing else: no envelope, no checksum, no key hashing, no status, no
metadata, no audit log. Every benchmark row measures the hub and its floor in
the same process, interleaved, so the ratio between them is the library's
overhead on this machine at this moment.

Choices that make the floor a *floor* (the fastest honest way, per PERF-NOTES):

* serialize with orjson for the json codec (the same bytes our codec's fast
  path writes, minus its one-byte form marker) and pickle protocol 5 for the
  pickle codec; the cyclic GC is paused while deserializing, for both;
* compress with the same algorithm and level as the serializer, and only when
  the serializer actually compressed (it skips data that does not shrink), so
  the floor never pays for a compression pass the library avoided;
* AES-256-GCM from ``cryptography``, a 12-byte random nonce prepended;
* drivers used at their fastest: ``write + fsync + os.replace`` for files, the
  stdlib ``sqlite3`` module (WAL, like the store), psycopg 3 with binary
  parameters and results into a ``bytea`` column with ``STORAGE EXTERNAL``,
  redis-py with its pure-Python command packer (hiredis' packer copies the
  value) and the hiredis reply parser, mongomock's collection API.
"""

from __future__ import annotations

import gc
import os
import pickle
import sqlite3
import zlib
from collections.abc import Callable
from typing import Any

import orjson
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["Pipeline", "RawStore", "RawMemory", "RawFile", "RawSqlite", "RawPostgres", "RawRedis", "RawMongomock", "RawNeo4j"]

_NONCE = 12


class Pipeline:
    """serialize -> compress -> encrypt, and back, with plain library calls.

    Args:
        codec: ``json`` (orjson) or ``pickle``.
        compression: ``zstd``, ``gzip`` or ``none`` (what the serializer applied).
        level: Compression level (the serializer's).
        key: 32-byte AES key.
    """

    def __init__(self, codec: str, compression: str, level: int, key: bytes) -> None:
        self.codec = codec
        self.compression = compression
        self._aes = AESGCM(key)
        self._dumps: Callable[[Any], bytes]
        self._loads: Callable[[Any], Any]
        if codec == "json":
            self._dumps, self._loads = orjson.dumps, orjson.loads
        elif codec == "pickle":
            self._dumps, self._loads = (lambda o: pickle.dumps(o, protocol=5)), pickle.loads
        else:
            raise ValueError(f"no floor for codec {codec!r}")
        self._compress: Callable[[bytes], bytes]
        self._decompress: Callable[[Any], bytes]
        if compression == "zstd":
            import zstandard

            comp = zstandard.ZstdCompressor(level=level, write_content_size=True)
            dec = zstandard.ZstdDecompressor()
            self._compress, self._decompress = comp.compress, dec.decompress
        elif compression == "gzip":

            def gz(data: bytes) -> bytes:
                c = zlib.compressobj(level, zlib.DEFLATED, 31)
                return c.compress(data) + c.flush()

            self._compress, self._decompress = gz, (lambda d: zlib.decompress(d, 31))
        elif compression == "none":
            self._compress, self._decompress = (lambda d: d), (lambda d: d)
        else:
            raise ValueError(f"no floor for compression {compression!r}")

    def encode(self, state: Any) -> bytes:
        """serialize + compress."""
        return self._compress(self._dumps(state))

    def encrypt(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return nonce + self._aes.encrypt(nonce, data, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        view = memoryview(blob)
        return self._aes.decrypt(bytes(view[:_NONCE]), view[_NONCE:], aad)

    def decode(self, data: bytes) -> Any:
        """decompress + deserialize (GC paused while the object graph is built)."""
        data = self._decompress(data)
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._loads(data)
        finally:
            if enabled:
                gc.enable()

    def codec_dumps(self, state: Any) -> bytes:
        return self._dumps(state)

    def codec_loads(self, data: bytes) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._loads(data)
        finally:
            if enabled:
                gc.enable()

    def seal(self, state: Any, aad: bytes) -> bytes:
        return self.encrypt(self.encode(state), aad)

    def open(self, blob: bytes, aad: bytes) -> Any:
        return self.decode(self.decrypt(blob, aad))


class RawStore:
    """Minimal key -> bytes store through one raw driver."""

    name = "raw"

    def put(self, key: str, blob: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections and remove everything this floor created."""


class RawMemory(RawStore):
    name = "dict"

    def __init__(self) -> None:
        self._d: dict[str, bytes] = {}

    def put(self, key: str, blob: bytes) -> None:
        self._d[key] = blob

    def get(self, key: str) -> bytes:
        return self._d[key]

    def delete(self, key: str) -> None:
        self._d.pop(key, None)

    def close(self) -> None:
        self._d.clear()


class RawFile(RawStore):
    """write + fsync + os.replace; read with one readall()."""

    name = "write+fsync+rename"

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)

    def put(self, key: str, blob: bytes) -> None:
        path = os.path.join(self.dir, key)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        with open(os.path.join(self.dir, key), "rb", buffering=0) as f:
            return f.readall()

    def delete(self, key: str) -> None:
        try:
            os.unlink(os.path.join(self.dir, key))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class RawSqlite(RawStore):
    """stdlib sqlite3, WAL (as the store), INSERT OR REPLACE in autocommit."""

    name = "sqlite3 INSERT OR REPLACE"

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL)")

    def put(self, key: str, blob: bytes) -> None:
        self._db.execute("INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)", (key, blob))

    def get(self, key: str) -> bytes:
        row = self._db.execute("SELECT v FROM kv WHERE k = ?", (key,)).fetchone()
        return bytes(row[0])

    def delete(self, key: str) -> None:
        self._db.execute("DELETE FROM kv WHERE k = ?", (key,))

    def close(self) -> None:
        self._db.close()
        for suffix in ("", "-wal", "-shm"):
            try:
                os.unlink(self.path + suffix)
            except FileNotFoundError:
                pass


class RawPostgres(RawStore):
    """psycopg 3, binary parameters and results, bytea with STORAGE EXTERNAL, autocommit."""

    name = "psycopg3 binary bytea"

    def __init__(self, dsn: str, table: str) -> None:
        import psycopg

        self.table = table
        self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5)
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (k text PRIMARY KEY, v bytea NOT NULL)")
        self._conn.execute(f"ALTER TABLE {table} ALTER COLUMN v SET STORAGE EXTERNAL")
        self._put = f"INSERT INTO {table} (k, v) VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
        self._get = f"SELECT v FROM {table} WHERE k = %s"

    def put(self, key: str, blob: bytes) -> None:
        with self._conn.cursor() as cur:
            cur.execute(self._put, (key, blob), binary=True)

    def get(self, key: str) -> bytes:
        with self._conn.cursor(binary=True) as cur:
            cur.execute(self._get, (key,))
            row = cur.fetchone()
        assert row is not None
        value = row[0]
        return value if isinstance(value, bytes) else bytes(value)

    def delete(self, key: str) -> None:
        self._conn.execute(f"DELETE FROM {self.table} WHERE k = %s", (key,))

    def close(self) -> None:
        try:
            self._conn.execute(f"DROP TABLE IF EXISTS {self.table}")
        finally:
            self._conn.close()


class RawRedis(RawStore):
    """redis-py SET/GET: pure-Python command packer (no copy of the value), hiredis reply parser."""

    name = "redis-py SET/GET"

    def __init__(self, url: str, prefix: str) -> None:
        import redis
        from redis.connection import Connection, PythonRespSerializer

        class _PurePackerConnection(Connection):
            # hiredis.pack_command copies a 10 MB value into a new buffer; the
            # pure-Python packer hands the value to sendall() as it is.
            def _construct_command_packer(self, packer: Any) -> Any:
                return PythonRespSerializer(self._buffer_cutoff, self.encoder.encode)

        pool = redis.ConnectionPool.from_url(url, connection_class=_PurePackerConnection)
        self._r = redis.Redis(connection_pool=pool)
        self.prefix = prefix
        self._keys: set[str] = set()

    def put(self, key: str, blob: bytes) -> None:
        k = self.prefix + key
        self._keys.add(k)
        self._r.set(k, blob)

    def get(self, key: str) -> bytes:
        value = self._r.get(self.prefix + key)
        assert isinstance(value, bytes)
        return value

    def delete(self, key: str) -> None:
        self._r.delete(self.prefix + key)

    def close(self) -> None:
        if self._keys:
            self._r.delete(*self._keys)
        self._r.close()


class RawMongomock(RawStore):
    """mongomock collection: replace_one(upsert) and find_one (in-process, like the mongomock client the store is given)."""

    name = "mongomock replace_one"

    def __init__(self) -> None:
        import mongomock
        from bson import Binary

        self._binary = Binary
        self._coll = mongomock.MongoClient().bench.floor

    def put(self, key: str, blob: bytes) -> None:
        self._coll.replace_one({"_id": key}, {"_id": key, "v": self._binary(blob)}, upsert=True)

    def get(self, key: str) -> bytes:
        doc = self._coll.find_one({"_id": key})
        assert doc is not None
        return bytes(doc["v"])

    def delete(self, key: str) -> None:
        self._coll.delete_one({"_id": key})

    def close(self) -> None:
        self._coll.drop()


class RawNeo4j(RawStore):
    """neo4j driver: the blob as ordered chunk nodes written in one transaction, read back in one query.

    On Neo4j the chunks go as byte parameters (``UNWIND $chunks``). On FalkorDB
    (detected as the store detects it: ``dbms.components()`` fails) they go the
    way the store must send them there: base64 literals packed into statements
    under 3,800 bytes, as FalkorDB's Bolt side refuses bytes parameters and
    crashes on bigger messages. ``chunk_size`` should equal the store's.
    """

    name = "neo4j driver, chunk nodes"
    max_statement = 3800

    def __init__(self, url: str, label: str, chunk_size: int, auth: tuple[str, str] | None = None) -> None:
        import neo4j

        self._driver = neo4j.GraphDatabase.driver(url, auth=auth)
        self.label = label
        self.chunk_size = chunk_size
        with self._driver.session() as s:
            try:
                s.run("CALL dbms.components() YIELD name RETURN name").consume()
                self.falkordb = False
            except Exception:  # noqa: BLE001 - FalkorDB answers this with an error
                self.falkordb = True
        self.name = "FalkorDB Bolt, base64 literal chunks" if self.falkordb else "neo4j driver, byte chunks"

    def _statements(self, key: str, blob: bytes) -> list[tuple[str, dict[str, Any]]]:
        import base64

        cs = self.chunk_size
        view = memoryview(blob)
        pieces = [view[i : i + cs] for i in range(0, len(blob), cs)] or [view[:0]]
        tail = f"] AS c CREATE (:{self.label} {{k: '{key}', i: c.i, v: c.v}})"
        if not self.falkordb:
            return [
                (
                    f"UNWIND $chunks AS c CREATE (:{self.label} {{k: $k, i: c.i, v: c.v}})",
                    {"k": key, "chunks": [{"i": i, "v": bytes(p)} for i, p in enumerate(pieces)]},
                )
            ]
        out: list[tuple[str, dict[str, Any]]] = []
        items: list[str] = []
        size = len("UNWIND [") + len(tail)
        for i, p in enumerate(pieces):
            item = "{i: %d, v: '%s'}" % (i, base64.b64encode(p).decode("ascii"))  # noqa: UP031
            if items and size + len(item) + 2 > self.max_statement:
                out.append(("UNWIND [" + ", ".join(items) + tail, {}))
                items, size = [], len("UNWIND [") + len(tail)
            items.append(item)
            size += len(item) + 2
        out.append(("UNWIND [" + ", ".join(items) + tail, {}))
        return out

    def put(self, key: str, blob: bytes) -> None:
        statements = self._statements(key, blob)
        with self._driver.session() as s:
            with s.begin_transaction() as tx:
                for text, params in statements:
                    tx.run(text, **params).consume()
                tx.commit()

    def get(self, key: str) -> bytes:
        import base64

        with self._driver.session() as s:
            rows = s.run(f"MATCH (c:{self.label} {{k: '{key}'}}) RETURN c.i AS i, c.v AS v ORDER BY c.i").values()
        if self.falkordb:
            return b"".join(base64.b64decode(v) for _, v in rows)
        return b"".join(bytes(v) for _, v in rows)

    def delete(self, key: str) -> None:
        with self._driver.session() as s:
            s.run(f"MATCH (c:{self.label} {{k: '{key}'}}) DELETE c").consume()

    def close(self) -> None:
        try:
            with self._driver.session() as s:
                s.run(f"MATCH (c:{self.label}) DELETE c").consume()
        finally:
            self._driver.close()
