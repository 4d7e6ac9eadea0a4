"""Typed resume input: a JSON Schema per suspension, checked before any claim.

``await_input(schema=...)`` takes a JSON Schema dict or a pydantic model. A
model is turned into its JSON Schema where the signature is made
(:func:`to_json_schema`), so what travels in the message and what is stored
beside the suspension (as clear, authenticated metadata: a schema is not a
secret) is plain JSON, and the process that resumes needs neither the model
class nor pydantic. :func:`validate` checks an input with ``jsonschema``
(extra ``schema``) and raises :class:`~celery_persist.errors.InvalidInput`
listing each problem's location and message.

Validation does not coerce: the next step receives the input as given, which
is JSON data by construction (it came through JSON, or was checked to be).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigurationError, InvalidInput
from .stores.drivers import require

__all__ = ["to_json_schema", "validate", "check_schema", "MAX_SCHEMA_BYTES"]

#: Largest schema kept beside a suspension (it is listed with it).
MAX_SCHEMA_BYTES = 32 * 1024


def to_json_schema(schema: Any) -> dict[str, Any] | None:
    """A JSON Schema dict for ``schema``: a dict (returned as a copy), a pydantic model class, or None.

    Raises:
        ConfigurationError: Anything else, or a dict that is not a valid JSON Schema.
    """
    if schema is None:
        return None
    if isinstance(schema, Mapping):
        out = dict(schema)
    elif isinstance(schema, type) and callable(make := getattr(schema, "model_json_schema", None)):
        out = dict(make())
    else:
        raise ConfigurationError(f"schema= takes a JSON Schema dict or a pydantic model class, not {type(schema).__name__}")
    check_schema(out)
    _keep_order(out)
    return out


def _keep_order(node: Any) -> None:
    """Record each object's property order as ``x-order``: stored metadata is JSON with sorted
    keys, and a form built from the schema should list fields in the order they were declared."""
    if isinstance(node, dict):
        properties = node.get("properties")
        if isinstance(properties, dict) and "x-order" not in node:
            node["x-order"] = list(properties)
        for value in node.values():
            _keep_order(value)
    elif isinstance(node, list):
        for item in node:
            _keep_order(item)


def check_schema(schema: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigurationError` when ``schema`` is not a valid JSON Schema."""
    jsonschema = require("jsonschema", extra="schema", store="typed input")
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.exceptions.SchemaError as exc:
        raise ConfigurationError(f"schema= is not a valid JSON Schema: {exc.message}") from None


def validate(schema: Mapping[str, Any] | None, value: Any, *, key: str | None = None) -> None:
    """Check ``value`` against ``schema`` (nothing to do without one).

    Raises:
        InvalidInput: With ``.errors`` = one ``{"loc", "msg"}`` per problem.
    """
    if not schema:
        return
    jsonschema = require("jsonschema", extra="schema", store="typed input")
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [_describe(error) for error in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))]
    if errors:
        summary = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'input'}: {e['msg']}" for e in errors[:5])
        raise InvalidInput(f"the resume input does not match the suspension's schema: {summary}", key=key, errors=errors)


def _describe(error: Any) -> dict[str, Any]:
    """``{"loc", "msg"}`` for a jsonschema error, without echoing the value given."""
    loc: list[Any] = list(error.absolute_path)
    validator, expected = error.validator, error.validator_value
    if validator == "required":
        # jsonschema reports a missing property at its parent; name the property itself.
        missing = [name for name in expected if isinstance(error.instance, dict) and name not in error.instance]
        return {"loc": [*loc, missing[0] if missing else "?"], "msg": "field required"}
    if validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in allowed)
        return {"loc": [*loc, extra[0] if extra else "?"], "msg": "unknown field"}
    messages = {
        "type": f"must be of type {expected}",
        "enum": f"must be one of {expected}",
        "const": f"must be {expected!r}",
        "minimum": f"must be >= {expected}",
        "maximum": f"must be <= {expected}",
        "exclusiveMinimum": f"must be > {expected}",
        "exclusiveMaximum": f"must be < {expected}",
        "minLength": f"must be at least {expected} characters",
        "maxLength": f"must be at most {expected} characters",
        "pattern": f"must match {expected}",
        "minItems": f"must have at least {expected} items",
        "maxItems": f"must have at most {expected} items",
        "format": f"must be a valid {expected}",
        "multipleOf": f"must be a multiple of {expected}",
    }
    return {"loc": loc, "msg": messages.get(validator, f"does not satisfy {validator}")}
