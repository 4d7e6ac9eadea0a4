"""How :class:`~celery_persist.stores.redis.RedisStore` reaches Redis: the parsed URL and the client.

:class:`RedisTarget` is the store URL and the connection options, checked once when the
store is opened: standalone (``redis://``, ``rediss://``, ``unix://``), Redis Cluster, or
Sentinel (``redis+sentinel://``, this package's own form: redis-py has no URL for it).
:meth:`RedisTarget.connect` builds the redis-py client, in the process that will use it.

Cluster: ``redis+cluster://`` / ``rediss+cluster://`` (this package's own form, naming one
or more nodes), or a ``redis://`` / ``rediss://`` URL with the store option ``cluster=True``.

Clients pack commands with :class:`_SplitPacker`: hiredis for commands with small
arguments, and redis-py's pure-Python packer, which sends a large value without copying
it, for commands with an argument over 64 KiB.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError
from .drivers import mask_url, require

__all__ = ["RedisTarget", "SCHEMES"]

#: URL schemes the Redis store serves.
SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster", "rediss+cluster")
#: This package's cluster schemes -> the redis-py scheme of their nodes.
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_REDIS_PORT = 6379
#: Commands with an argument larger than this are packed without copying it.
_LARGE_ARG = 64 * 1024
_SENTINEL_PORT = 26379
#: Connection keyword arguments a redis-py pool takes out before it builds connections
#: (``ConnectionPool`` and ``SentinelConnectionPool`` pop them; their signatures do not list them).
_POOL_POPPED = frozenset({"cache", "cache_config", "maint_notifications_pool_handler"})
_SENTINEL_POOL_POPPED = frozenset({"ssl", "is_master", "check_connection"})


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """The store URL, parsed and checked: which servers, and the client options.

    Attributes:
        url: The URL as given (handed to redis-py unchanged, except for sentinels and
            ``redis+cluster://``).
        name: The URL with its password masked, for messages.
        mode: ``"standalone"``, ``"cluster"`` or ``"sentinel"``.
        options: Keyword arguments for the redis-py client (store options, then
            ``client_options``); the URL's query options win over them in redis-py.
        sentinels: ``(host, port)`` of each sentinel (sentinel mode only).
        service: The monitored master's name (sentinel mode only).
        url_options: What redis-py reads from the URL (typed by redis-py); for
            sentinels, the options of the master connections.
        sentinel_options: ``username`` / ``password`` for the sentinels themselves.
        refused_options: URL query options no class on redis-py's way takes
            (see :meth:`check`); names only.
        connection_class: Name of the connection class they were checked against.
        cluster_url: For ``redis+cluster://``: the ``redis://`` / ``rediss://`` URL of its
            first node that ``RedisCluster.from_url`` reads (credentials, query options).
        cluster_nodes: For ``redis+cluster://``: ``(host, port)`` of its other nodes.
    """

    url: str
    name: str
    mode: str
    options: Mapping[str, Any]
    sentinels: tuple[tuple[str, int], ...] = ()
    service: str = ""
    url_options: Mapping[str, Any] = field(default_factory=dict)
    sentinel_options: Mapping[str, Any] = field(default_factory=dict)
    refused_options: tuple[str, ...] = ()
    connection_class: str = ""
    cluster_url: str = ""
    cluster_nodes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(
        cls,
        url: str,
        redis: ModuleType,
        *,
        cluster: bool = False,
        socket_timeout: float | None = 30.0,
        socket_connect_timeout: float | None = 5.0,
        client_options: Mapping[str, Any] | None = None,
    ) -> RedisTarget:
        """Check ``url`` and the options against each other (nothing connects).

        Raises:
            ConfigurationError: Unknown scheme, a malformed URL, or options that do
                not combine (``cluster`` with sentinels, unix sockets or ``/db``).
        """
        name = mask_url(url)
        scheme = url.partition("://")[0].lower()
        if scheme not in SCHEMES:
            raise ConfigurationError(
                f"the Redis store serves {', '.join(s + '://' for s in SCHEMES)} URLs, not {scheme}://",
                store=name,
            )
        options = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout, **(client_options or {})}
        if scheme == "redis+sentinel":
            if cluster:
                raise ConfigurationError("cluster=True does not combine with redis+sentinel://", store=name)
            target = cls._parse_sentinel(url, name, redis, options)
        elif scheme in _CLUSTER_SCHEMES:
            target = cls._parse_cluster(url, name, scheme, redis, options)
        else:
            if cluster and scheme == "unix":
                raise ConfigurationError("Redis Cluster does not serve unix:// sockets", store=name)
            try:
                url_options = dict(redis.connection.parse_url(url))
            except ValueError as exc:
                raise ConfigurationError(f"bad Redis URL {name!r}: {exc}", store=name) from None
            refused: tuple[str, ...] = ()
            connection_class: type[Any] = redis.Connection
            if not cluster:
                # RedisCluster drops the options it does not know; a plain pool hands them to
                # its connection class, which raises TypeError on the first command.
                connection_class = options.get("connection_class") or url_options.get("connection_class") or redis.Connection
                refused = _refused(_query_names(urlsplit(url).query), [redis.ConnectionPool, connection_class], _POOL_POPPED)
            if cluster and url_options.get("db", 0) != 0:
                raise ConfigurationError("Redis Cluster has only database 0; drop the /db from the URL", store=name)
            target = cls(
                url,
                name,
                "cluster" if cluster else "standalone",
                options,
                url_options=url_options,
                refused_options=refused,
                connection_class=connection_class.__name__,
            )
        if target.url_options.get("decode_responses") or options.get("decode_responses"):
            raise ConfigurationError("the Redis store needs decode_responses off (blobs are bytes)", store=name)
        return target

    @classmethod
    def _parse_cluster(cls, url: str, name: str, scheme: str, redis: ModuleType, options: dict[str, Any]) -> RedisTarget:
        """``redis+cluster://[user:password@]host[:port][,host[:port]...][/0][?option=value...]``.

        Any one reachable node is enough to discover the cluster; naming several keeps a
        new client working while one of them is down. The first node, the credentials and
        the query options become a ``redis://`` (``rediss://``) URL for
        ``RedisCluster.from_url``, so they are typed exactly as there; the other nodes are
        passed as ``startup_nodes``.
        """
        parts = urlsplit(url)
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        nodes = _host_list(hostlist, url, _REDIS_PORT)
        db = parts.path.strip("/")
        if not nodes or "/" in db:
            raise ConfigurationError(
                f"cluster URL {name!r} must look like '{scheme}://[user:password@]host[:port][,host[:port]...][?option=value...]'"
            )
        if db not in ("", "0"):
            raise ConfigurationError("Redis Cluster has only database 0; drop the /db from the URL", store=name)
        host, port = nodes[0]
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        seed = urlunsplit((_CLUSTER_SCHEMES[scheme], f"{userinfo}@{netloc}" if userinfo else netloc, "", parts.query, ""))
        try:
            url_options = dict(redis.connection.parse_url(seed))
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {name!r}: {exc}", store=name) from None
        return cls(url, name, "cluster", options, url_options=url_options, cluster_url=seed, cluster_nodes=tuple(nodes[1:]))

    @classmethod
    def _parse_sentinel(cls, url: str, name: str, redis: ModuleType, options: dict[str, Any]) -> RedisTarget:
        """``redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db][?option=value...]``."""
        parts = urlsplit(url)
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        sentinels = _host_list(hostlist, url, _SENTINEL_PORT)
        segments = [unquote(s) for s in parts.path.split("/") if s]
        if not sentinels or not segments or len(segments) > 2:
            raise ConfigurationError(
                f"sentinel URL {name!r} must look like 'redis+sentinel://[user:password@]host[:port][,host[:port]...]/service_name[/db]'"
            )
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        sentinel_options: dict[str, Any] = {}
        for option in ("sentinel_username", "sentinel_password"):
            if option in query:
                sentinel_options[option.removeprefix("sentinel_")] = query.pop(option)
        db = segments[1] if len(segments) == 2 else "0"
        # Let redis-py type the query options and credentials exactly as for redis://.
        shadow = f"redis://{userinfo + '@' if userinfo else ''}sentinel/{db}"
        if query:
            shadow += "?" + urlencode(query)
        try:
            url_options = dict(redis.connection.parse_url(shadow))
        except ValueError as exc:
            raise ConfigurationError(f"bad store URL {name!r}: {exc}") from None
        sentinel_mod = require("redis.sentinel", extra="redis", store="redis")
        connection_class = options.get("connection_class") or (
            sentinel_mod.SentinelManagedSSLConnection if "ssl" in query else sentinel_mod.SentinelManagedConnection
        )
        refused = _refused(
            _query_names(urlencode(query)),
            [sentinel_mod.SentinelConnectionPool, connection_class],
            _POOL_POPPED | _SENTINEL_POOL_POPPED,
        )
        url_options.pop("host", None)
        url_options.pop("port", None)
        return cls(
            url,
            name,
            "sentinel",
            options,
            tuple(sentinels),
            segments[0],
            url_options,
            sentinel_options,
            refused_options=refused,
            connection_class=connection_class.__name__,
        )

    @property
    def cluster(self) -> bool:
        """True when the URL names a node of a Redis Cluster."""
        return self.mode == "cluster"

    def check(self) -> None:
        """Refuse URL query options redis-py would hand to a connection class that does not take them.

        redis-py passes an option it has no parser for to the connection class as a
        string, which raises a bare TypeError on the first command (redis-py 8:
        ``sentinel_password`` or ``ssl_keyfile_password`` on ``redis://``, ``ssl_*``
        on a non-TLS URL). :meth:`connect` calls this first, so the first operation
        raises instead. (Not when the store is opened: an application binds its store
        when it starts, and reports it, before any operation.) Names the options,
        never their values.

        Raises:
            ConfigurationError: An option no class on the way takes.
        """
        unknown = self.refused_options
        if not unknown:
            return
        hint = ""
        if any(n.startswith("sentinel_") for n in unknown):
            hint = " (sentinel_username / sentinel_password apply to redis+sentinel:// URLs only)"
        elif any(n.startswith("ssl") for n in unknown):
            hint = " (TLS options need a rediss:// URL, or ?ssl=true on redis+sentinel://)"
        many = len(unknown) > 1
        raise ConfigurationError(
            f"Redis URL option{'s' if many else ''} {', '.join(repr(n) for n in unknown)} "
            f"not taken by redis-py's {self.connection_class}{hint}: remove {'them' if many else 'it'} from the store URL",
            store=self.name,
        )

    def connect(self, redis: ModuleType, retries: int) -> Any:
        """A new redis-py client for this target; reconnects ``retries`` times with backoff.

        Raises:
            ConfigurationError: See :meth:`check`.
        """
        self.check()
        packer = _make_packer(redis)
        backoff = redis.backoff.ExponentialWithJitterBackoff(cap=1.0, base=0.05)
        retry = redis.retry.Retry(backoff, retries)
        options = dict(self.options)
        if self.mode == "cluster":
            cluster_mod = require("redis.cluster", extra="redis", store="redis")
            pool_class = options.pop("connection_pool_class", None)
            if pool_class is None and packer is not None:
                pool_class = _packer_pool_class(redis, packer)
            if pool_class is not None:
                options["connection_pool_class"] = pool_class
            if self.cluster_nodes:
                options["startup_nodes"] = [cluster_mod.ClusterNode(host, port) for host, port in self.cluster_nodes]
            # Cluster node connections never retry; RedisCluster retries, re-reading the topology.
            return cluster_mod.RedisCluster.from_url(self.cluster_url or self.url, retry=retry, **options)
        options.setdefault("retry", retry)
        if packer is not None:
            options.setdefault("command_packer", packer)
        if self.mode == "sentinel":
            sentinel_mod = require("redis.sentinel", extra="redis", store="redis")
            sentinel_kwargs = {
                "socket_timeout": options.get("socket_timeout"),
                "socket_connect_timeout": options.get("socket_connect_timeout"),
                **self.sentinel_options,
            }
            manager = sentinel_mod.Sentinel(list(self.sentinels), sentinel_kwargs=sentinel_kwargs)
            return manager.master_for(self.service, **{**options, **self.url_options})
        return redis.Redis.from_url(self.url, **options)


def _query_names(query: str) -> list[str]:
    """The option names redis-py's ``parse_url`` passes on (it skips blank values)."""
    return list(parse_qs(query))


def _init_parameters(classes: Iterable[type[Any]]) -> set[str]:
    """Keyword parameters of ``__init__`` along each class's MRO (``**kwargs`` pass them up)."""
    names: set[str] = set()
    for cls in classes:
        for klass in getattr(cls, "__mro__", (cls,)):
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            try:
                params = inspect.signature(init).parameters.values()
            except (TypeError, ValueError):
                continue
            names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    names.discard("self")
    return names


def _refused(names: Iterable[str], classes: Iterable[type[Any]], popped: Iterable[str]) -> tuple[str, ...]:
    """The option ``names`` that neither the pool nor the connection classes take, sorted."""
    return tuple(sorted(set(names) - _init_parameters(classes) - set(popped)))


def _host_list(hostlist: str, url: str, default_port: int) -> list[tuple[str, int]]:
    """``host[:port],[v6addr]:port,...`` -> ``[(host, port), ...]``."""
    hosts: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else ""
        else:
            host, sep, port = item.rpartition(":")
            if not sep:
                host, port = item, ""
        try:
            hosts.append((unquote(host), int(port) if port else default_port))
        except ValueError:
            raise ConfigurationError(f"bad port in {mask_url(url)!r}") from None
    return hosts


class _SplitPacker:
    """redis-py command packer: hiredis for small commands, pure Python for large values.

    hiredis builds one buffer holding every argument (a copy of a 10 MB blob);
    redis-py's ``PythonRespSerializer`` sends an argument over its cutoff as its
    own chunk, uncopied, but is several times slower per small command.
    """

    def __init__(self, connection: ModuleType) -> None:
        encode = connection.Encoder("utf-8", "strict", False).encode
        # 6000 is redis-py's own cutoff between joined and separately sent arguments.
        self._python = connection.PythonRespSerializer(6000, encode)
        self._hiredis = connection.HiredisRespSerializer() if connection.HIREDIS_AVAILABLE else None

    def pack(self, *args: Any) -> list[Any]:
        if self._hiredis is not None:
            for arg in args:
                if isinstance(arg, bytes | bytearray | memoryview) and len(arg) > _LARGE_ARG:
                    break
            else:
                packed: list[Any] = self._hiredis.pack(*args)
                return packed
        packed = self._python.pack(*args)
        return packed


def _make_packer(redis: ModuleType) -> _SplitPacker | None:
    connection = redis.connection
    needed = ("PythonRespSerializer", "HiredisRespSerializer", "Encoder", "HIREDIS_AVAILABLE")
    if not all(hasattr(connection, name) for name in needed):
        # An older redis-py without the command_packer hook: keep its default packer.
        return None
    return _SplitPacker(connection)


def _packer_pool_class(redis: ModuleType, packer: _SplitPacker) -> type[Any]:
    """A ConnectionPool that gives its connections ``packer``.

    RedisCluster drops unknown connection keyword arguments such as
    ``command_packer`` but accepts a pool class.
    """

    class PackerConnectionPool(redis.ConnectionPool):  # type: ignore[misc,name-defined]
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("command_packer", packer)
            super().__init__(**kwargs)

    return PackerConnectionPool
