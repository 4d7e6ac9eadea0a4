"""``docker/docker-compose.yml``, checked offline (no Docker engine runs where the suite does).

Three layers:

* the file validates against :data:`SCHEMA`, a JSON Schema of the part of the
  Compose specification it uses (services with image/build, command, environment,
  depends_on with conditions, ports, volumes, healthcheck, profiles), strict
  about unknown keys so a typo (``depend_on``, ``healtcheck``) fails. It is checked
  with ``jsonschema`` when that is installed, and always with
  :func:`schema_errors`, a small validator for the keywords the schema uses;
* references resolve: ``depends_on`` names services, ``service_healthy`` needs a
  healthcheck, named volumes are declared;
* what the file tells the test suite matches the suite: every variable it gives
  the test runner (the ``tests`` service and the ``export`` lines of its header)
  is one the tests read, and the servers the suite needs are there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "docker-compose.yml"
TESTS = ROOT / "tests"

#: The servers the suite talks to (scripts/services starts them locally), and the optional ones.
REQUIRED_SERVICES = ("redis", "postgres", "rabbitmq", "mariadb")
OPTIONAL_SERVICES = ("mongodb", "neo4j")
#: ``CELERY_PERSIST_TEST_<NAME>_URL`` -> the compose service it points at.
URL_SERVICE = {
    "REDIS": "redis",
    "POSTGRES": "postgres",
    "POSTGRESQL": "postgres",
    "RABBITMQ": "rabbitmq",
    "MARIADB": "mariadb",
    "MONGODB": "mongodb",
    "NEO4J": "neo4j",
}
TEST_RUNNER = "tests"

_STRING_LIST = {"type": "array", "items": {"type": "string"}}
_SCALAR = {"type": ["string", "number", "boolean", "null"]}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["services"],
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9][a-z0-9_-]*$"},
        "services": {
            "type": "object",
            "minProperties": 1,
            "patternProperties": {"^[a-zA-Z0-9._-]+$": {"$ref": "#/$defs/service"}},
            "additionalProperties": False,
        },
        "volumes": {
            "type": "object",
            "patternProperties": {"^[a-zA-Z0-9._-]+$": {"type": ["object", "null"]}},
            "additionalProperties": False,
        },
    },
    "patternProperties": {"^x-": {}},
    "additionalProperties": False,
    "$defs": {
        "service": {
            "type": "object",
            "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
            "properties": {
                "image": {"type": "string", "minLength": 1},
                "build": {
                    "anyOf": [
                        {"type": "string"},
                        {
                            "type": "object",
                            "properties": {"context": {"type": "string"}, "dockerfile": {"type": "string"}},
                            "additionalProperties": False,
                        },
                    ]
                },
                "command": {"anyOf": [{"type": "string"}, _STRING_LIST]},
                "working_dir": {"type": "string"},
                "environment": {
                    "anyOf": [
                        {"type": "object", "patternProperties": {"^[A-Za-z_][A-Za-z0-9_]*$": _SCALAR}, "additionalProperties": False},
                        {"type": "array", "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*(=.*)?$"}},
                    ]
                },
                "depends_on": {
                    "anyOf": [
                        _STRING_LIST,
                        {
                            "type": "object",
                            "additionalProperties": {
                                "type": "object",
                                "required": ["condition"],
                                "properties": {
                                    "condition": {"enum": ["service_started", "service_healthy", "service_completed_successfully"]},
                                    "restart": {"type": "boolean"},
                                    "required": {"type": "boolean"},
                                },
                                "additionalProperties": False,
                            },
                        },
                    ]
                },
                "ports": {
                    "type": "array",
                    "items": {
                        "anyOf": [{"type": "integer"}, {"type": "string", "pattern": r"^((\d{1,3}\.){3}\d{1,3}:)?(\d+:)?\d+(/(tcp|udp))?$"}]
                    },
                },
                "volumes": {"type": "array", "items": {"type": "string", "pattern": "^[^:]+:/[^:]*(:(ro|rw))?$"}},
                "healthcheck": {
                    "type": "object",
                    "required": ["test"],
                    "properties": {
                        "test": {"anyOf": [{"type": "string"}, {"type": "array", "minItems": 2, "items": {"type": "string"}}]},
                        "interval": {"$ref": "#/$defs/duration"},
                        "timeout": {"$ref": "#/$defs/duration"},
                        "start_period": {"$ref": "#/$defs/duration"},
                        "retries": {"type": "integer", "minimum": 1},
                    },
                    "additionalProperties": False,
                },
                "profiles": _STRING_LIST,
            },
            "patternProperties": {"^x-": {}},
            "additionalProperties": False,
        },
        "duration": {"type": "string", "pattern": r"^(\d+(\.\d+)?(us|ms|s|m|h))+$"},
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _is(value: Any, name: str) -> bool:
    if isinstance(value, bool) and name in ("integer", "number"):
        return False
    return isinstance(value, _TYPES[name])


def schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, path: str = "$") -> Iterator[str]:
    """Errors of ``value`` against ``schema``, for the JSON Schema keywords :data:`SCHEMA` uses."""
    root = schema if root is None else root
    if "$ref" in schema:
        target: Any = root
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        yield from schema_errors(value, target, root, path)
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        if not any(_is(value, t) for t in types):
            yield f"{path}: expected {' or '.join(types)}, got {type(value).__name__}"
            return
    if "enum" in schema and value not in schema["enum"]:
        yield f"{path}: {value!r} is not one of {schema['enum']}"
    if "anyOf" in schema:
        branches = [list(schema_errors(value, s, root, path)) for s in schema["anyOf"]]
        if all(branches):
            # Explain with the closest form: the one with fewest errors (a wrong type counts as many).
            closest = min(branches, key=lambda errors: (any(" expected " in e for e in errors[:1]), len(errors)))
            yield f"{path}: matches none of the allowed forms ({'; '.join(closest)})"
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            yield f"{path}: {value!r} does not match {schema['pattern']}"
        if len(value) < schema.get("minLength", 0):
            yield f"{path}: too short"
    if isinstance(value, int | float) and not isinstance(value, bool) and value < schema.get("minimum", value):
        yield f"{path}: below {schema['minimum']}"
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            yield f"{path}: fewer than {schema['minItems']} items"
        if "items" in schema:
            for i, item in enumerate(value):
                yield from schema_errors(item, schema["items"], root, f"{path}[{i}]")
    if isinstance(value, dict):
        for name in schema.get("required", ()):
            if name not in value:
                yield f"{path}: {name!r} is required"
        if len(value) < schema.get("minProperties", 0):
            yield f"{path}: fewer than {schema['minProperties']} entries"
        for key, item in value.items():
            sub = f"{path}.{key}"
            matched = False
            if key in schema.get("properties", {}):
                matched = True
                yield from schema_errors(item, schema["properties"][key], root, sub)
            for pattern, pattern_schema in schema.get("patternProperties", {}).items():
                if re.search(pattern, str(key)):
                    matched = True
                    yield from schema_errors(item, pattern_schema, root, sub)
            if not matched:
                extra = schema.get("additionalProperties", True)
                if extra is False:
                    yield f"{path}: unexpected key {key!r}"
                elif isinstance(extra, dict):
                    yield from schema_errors(item, extra, root, sub)


def _load() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return dict(env)


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: spec["condition"] for name, spec in deps.items()}


def _header_exports() -> dict[str, str]:
    """``NAME=value`` of every ``#   export NAME=value`` line in the file's comments."""
    found = re.findall(r"^#\s+export\s+([A-Z_][A-Z0-9_]*)=(\S+)", COMPOSE.read_text(encoding="utf-8"), re.MULTILINE)
    return dict(found)


def _names_the_suite_reads() -> set[str]:
    """Environment variable names that appear as string literals in the tests (other than this file)."""
    names: set[str] = set()
    for path in TESTS.rglob("*.py"):
        if path.resolve() == Path(__file__).resolve():
            continue
        names.update(re.findall(r"""["']([A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+)["']""", path.read_text(encoding="utf-8")))
    return names


# -- the schema -----------------------------------------------------------------------------------


def test_compose_file_matches_the_schema(compose: dict[str, Any]) -> None:
    errors = list(schema_errors(compose, SCHEMA))
    assert not errors, "\n".join(errors)


def test_compose_file_matches_the_schema_with_jsonschema(compose: dict[str, Any]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed; schema_errors() checked the file")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(compose)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["services"]["redis"].update(healtcheck={"test": ["CMD", "true"]}), "unexpected key 'healtcheck'"),
        (lambda d: d["services"]["worker"].update(depend_on=["redis"]), "unexpected key 'depend_on'"),
        (lambda d: d["services"]["worker"]["depends_on"]["redis"].update(condition="healthy"), "is not one of"),
        (lambda d: d["services"]["redis"].pop("image"), "matches none of the allowed forms"),
        (lambda d: d["services"]["redis"]["healthcheck"].update(interval="2 seconds"), "does not match"),
        (lambda d: d["services"]["redis"]["healthcheck"].update(retries="30"), "expected integer"),
        (lambda d: d["services"]["redis"].update(ports=["6379-6380"]), "matches none of the allowed forms"),
        (lambda d: d["services"]["postgres"].update(environment={"POSTGRES_DB": ["persist"]}), "matches none of the allowed forms"),
        (lambda d: d.update(servces={}), "unexpected key 'servces'"),
    ],
)
def test_the_checker_catches_mistakes(change: Any, expected: str) -> None:
    broken = _load()
    change(broken)
    errors = list(schema_errors(broken, SCHEMA))
    assert any(expected in e for e in errors), errors
    try:
        import jsonschema
    except ImportError:
        return
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(broken)), "jsonschema accepts what schema_errors() refuses"


# -- references -----------------------------------------------------------------------------------


def test_dependencies_resolve(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        for dep, condition in _depends_on(service).items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared_volumes, f"{name} mounts undeclared volume {source!r}"


def test_the_servers_the_suite_needs_are_there(services: dict[str, dict[str, Any]]) -> None:
    for name in (*REQUIRED_SERVICES, *OPTIONAL_SERVICES):
        assert name in services, f"no {name} service"
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_every_port_is_local_only(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_the_package_is_installed_once(services: dict[str, dict[str, Any]]) -> None:
    def command(service: dict[str, Any]) -> str:
        cmd = service.get("command") or ""
        return cmd if isinstance(cmd, str) else " ".join(cmd)

    installers = [name for name, s in services.items() if "pip install" in command(s)]
    assert installers == ["install"], f"pip install runs in {installers}"
    for name, service in services.items():
        if name != "install" and "/venv" in str(service.get("volumes")):
            assert _depends_on(service).get("install") == "service_completed_successfully", f"{name} does not wait for install"


def test_flower_api_answers(services: dict[str, dict[str, Any]]) -> None:
    assert str(_environment(services["flower"]).get("FLOWER_UNAUTHENTICATED_API")).lower() == "true"


# -- what the file tells the test suite -----------------------------------------------------------


def test_runner_variables_are_the_ones_the_suite_reads(services: dict[str, dict[str, Any]]) -> None:
    runner = {k for k in _environment(services[TEST_RUNNER]) if k.startswith("CELERY_PERSIST_")}
    exported = set(_header_exports())
    assert runner, "the tests service sets no CELERY_PERSIST_ variables"
    assert runner == exported, f"the tests service and the header's exports differ: {sorted(runner ^ exported)}"
    unread = sorted(runner - _names_the_suite_reads())
    assert not unread, f"the test suite reads none of {unread}"


def test_every_service_url_the_suite_reads_is_given(services: dict[str, dict[str, Any]]) -> None:
    runner = _environment(services[TEST_RUNNER])
    for name in sorted(_names_the_suite_reads()):
        match = re.fullmatch(r"CELERY_PERSIST_TEST_([A-Z0-9]+)_URL", name)
        if match and match[1] in URL_SERVICE:
            assert name in runner, f"the suite reads {name} ({URL_SERVICE[match[1]]}), the tests service does not set it"
    for service in REQUIRED_SERVICES:
        assert any(URL_SERVICE.get(n.split("_")[3]) == service for n in runner if n.startswith("CELERY_PERSIST_TEST_")), service


def test_runner_urls_point_at_the_services(services: dict[str, dict[str, Any]]) -> None:
    runner = _environment(services[TEST_RUNNER])
    exported = _header_exports()
    for name, url in runner.items():
        match = re.fullmatch(r"CELERY_PERSIST_TEST_([A-Z0-9]+)_URL", name)
        if not match:
            continue
        service = URL_SERVICE[match[1]]
        inside, outside = urlsplit(str(url)), urlsplit(exported[name])
        assert inside.hostname == service, f"{name} points at {inside.hostname!r}, not the {service} service"
        assert outside.hostname == "127.0.0.1", f"the header's {name} is not a local URL"
        published = [str(p).split(":")[1] for p in services[service].get("ports", [])]
        assert str(outside.port) in published, f"the header's {name} uses port {outside.port}, which {service} does not publish"
        assert (inside.username, inside.password, inside.path) == (outside.username, outside.password, outside.path), name
