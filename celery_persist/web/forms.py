"""HTML forms built from a suspension's JSON Schema, and form data turned back into its input.

:func:`build_form` walks the schema (local ``$ref``\\ s, pydantic's ``anyOf: [X,
null]`` for optional fields) into a tree of :class:`Field`: booleans become
checkboxes, enums radio buttons (up to :data:`RADIO_MAX` choices) or a select,
numbers and strings inputs with their bounds, nested objects fieldsets, and
anything else (arrays, free-form objects, unions) a JSON textarea. No schema
at all gives one JSON textarea for the whole input.

:func:`parse_form` turns the submitted fields back into the input and reports
what does not even parse (a word in a number field, broken JSON) with the
same error shape as :class:`~celery_persist.errors.InvalidInput`:
``{"loc": [path parts], "msg": str}``. Checking the value against the schema
is the core's job (``persist.resume`` validates before any claim); this module
only has to produce JSON data of the right shape.

Form field names are ``in`` for the input itself and ``in/<part>/<part>`` for
a property (parts escaped as in a JSON pointer), so the path of an error's
``loc`` finds its field again (:func:`field_name`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Field", "build_form", "parse_form", "field_name", "initial_values", "errors_by_field", "RADIO_MAX"]

#: Enums with at most this many choices are radio buttons; longer ones are a select.
RADIO_MAX = 4
#: Nested objects deeper than this (or a recursive model) are edited as JSON.
MAX_DEPTH = 6
#: Strings allowed longer than this (or unbounded) get a textarea, unless they have a pattern or a format.
TEXTAREA_FROM = 200
_INTEGER = re.compile(r"[+-]?\d+")
_STRING_TYPES = {"email": "email", "uri": "url", "date": "date", "time": "time"}


@dataclass(frozen=True, slots=True)
class Field:
    """One form control (or a fieldset of them).

    Attributes:
        name: The form field name (``in``, ``in/address/city``).
        path: Where the value goes in the input.
        label: What the user reads.
        widget: ``checkbox``, ``radio``, ``select``, ``number``, ``text``,
            ``textarea``, ``json``, ``const`` or ``fieldset``.
        required: The schema requires it.
        help: The schema's description.
        attrs: HTML attributes of the input (type, min, max, step, minlength, maxlength, pattern).
        options: ``(value, label)`` pairs of a radio or select; the value is the choice as JSON.
        children: The fields of a fieldset.
        kind: How the raw value parses: ``boolean``, ``integer``, ``number``,
            ``string``, ``choice``, ``const``, ``json`` or ``object``.
        nullable: The schema allows null (an empty control then means null when required).
        default: The initial raw value (what the control shows before anything is entered).
    """

    name: str
    path: tuple[str, ...]
    label: str
    widget: str
    required: bool = False
    help: str | None = None
    attrs: Mapping[str, str] = field(default_factory=dict)
    options: tuple[tuple[str, str], ...] = ()
    children: tuple[Field, ...] = ()
    kind: str = "json"
    nullable: bool = False
    default: str = ""
    const: Any = None


def field_name(path: Sequence[object]) -> str:
    """The form field name of ``path`` (``["address", "city"]`` -> ``in/address/city``)."""
    return "in" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _humanize(name: str) -> str:
    text = re.sub(r"[_\-]+", " ", name).strip()
    return text[:1].upper() + text[1:] if text else name


def _resolve(node: Any, root: Mapping[str, Any], seen: frozenset[str] = frozenset()) -> tuple[dict[str, Any], frozenset[str]]:
    """``node`` with a local ``$ref`` (and a one-element ``allOf``) merged in; ``seen`` stops recursion."""
    if not isinstance(node, Mapping):
        return {}, seen
    out = dict(node)
    for _ in range(16):
        ref = out.get("$ref")
        all_of = out.get("allOf")
        if isinstance(ref, str) and ref.startswith("#/") and ref not in seen:
            target: Any = root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                target = target.get(part) if isinstance(target, Mapping) else None
            if not isinstance(target, Mapping):
                break
            seen = seen | {ref}
            del out["$ref"]
            out = {**target, **out}  # the referring schema's siblings (default, title) win
        elif isinstance(all_of, list) and len(all_of) == 1 and isinstance(all_of[0], Mapping):
            del out["allOf"]
            out = {**all_of[0], **out}
        else:
            break
    return out, seen


def _unwrap_null(node: dict[str, Any], root: Mapping[str, Any], seen: frozenset[str]) -> tuple[dict[str, Any], bool, frozenset[str]]:
    """``(schema, nullable)``: ``anyOf``/``oneOf`` of one schema and null, or a type list with "null", unwrapped."""
    for key in ("anyOf", "oneOf"):
        alts = node.get(key)
        if isinstance(alts, list):
            others = [a for a in alts if not (isinstance(a, Mapping) and a.get("type") == "null")]
            if len(others) == 1 and len(alts) == 2:
                inner, seen = _resolve(others[0], root, seen)
                rest = {k: v for k, v in node.items() if k != key}
                return {**inner, **rest}, True, seen
    types = node.get("type")
    if isinstance(types, list):
        real = [t for t in types if t != "null"]
        if len(real) == 1:
            return {**node, "type": real[0]}, "null" in types, seen
    return node, False, seen


def _json_default(node: Mapping[str, Any]) -> str:
    return json.dumps(node["default"], indent=2, ensure_ascii=False) if "default" in node else ""


def _number_text(value: Any) -> str:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else ""


def _ordered(node: Mapping[str, Any], props: Mapping[str, Any]) -> list[str]:
    """The property names in display order: an ``x-order`` (or ``propertyOrder``) list first, then the rest as given.

    A store may hand metadata back with its keys sorted (JSONB does), so the
    declared order of a model's fields survives only where the schema lists it.
    """
    hint = node.get("x-order", node.get("propertyOrder"))
    first = [str(n) for n in hint if str(n) in props] if isinstance(hint, list) else []
    return list(dict.fromkeys([*first, *(str(n) for n in props)]))


def _field(path: tuple[str, ...], raw: Any, required: bool, root: Mapping[str, Any], seen: frozenset[str], depth: int) -> Field:
    node, seen = _resolve(raw, root, seen)
    node, nullable, seen = _unwrap_null(node, root, seen)
    title = raw.get("title") if isinstance(raw, Mapping) and isinstance(raw.get("title"), str) else None
    label = title or (_humanize(path[-1]) if path else str(node.get("title") or "Input"))
    description = node.get("description")
    common: dict[str, Any] = {
        "name": field_name(path),
        "path": path,
        "label": label,
        "required": required,
        "help": description if isinstance(description, str) else None,
        "nullable": nullable,
    }
    has_default = "default" in node and node["default"] is not None
    if "const" in node:
        return Field(**common, widget="const", kind="const", const=node["const"], default=json.dumps(node["const"], ensure_ascii=False))
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        options = tuple((json.dumps(v, ensure_ascii=False), str(v) if v is not None else "(none)") for v in enum)
        widget = "radio" if len(options) <= RADIO_MAX else "select"
        default = json.dumps(node["default"], ensure_ascii=False) if has_default else ""
        return Field(**common, widget=widget, kind="choice", options=options, default=default)
    kind = node.get("type")
    if kind == "boolean":
        return Field(**common, widget="checkbox", kind="boolean", default="on" if node.get("default") is True else "")
    if kind in ("integer", "number"):
        attrs = {"type": "number", "step": "1" if kind == "integer" else "any"}
        for key, attr in (("minimum", "min"), ("exclusiveMinimum", "min"), ("maximum", "max"), ("exclusiveMaximum", "max")):
            if _number_text(node.get(key)):
                attrs[attr] = _number_text(node.get(key))
        if _number_text(node.get("multipleOf")):
            attrs["step"] = _number_text(node.get("multipleOf"))
        return Field(**common, widget="number", kind=kind, attrs=attrs, default=_number_text(node.get("default")))
    if kind == "string":
        attrs = {"type": _STRING_TYPES.get(str(node.get("format")), "text")}
        min_len, max_len = node.get("minLength"), node.get("maxLength")
        if isinstance(min_len, int):
            attrs["minlength"] = str(min_len)
        if isinstance(max_len, int):
            attrs["maxlength"] = str(max_len)
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            # JSON Schema patterns search anywhere; an HTML pattern must match the whole value.
            attrs["pattern"] = f".*(?:{pattern}).*"
        # Free text (no pattern or format, long or unbounded) gets room; a textarea cannot check a pattern.
        long = not isinstance(max_len, int) or max_len > TEXTAREA_FROM
        widget = "textarea" if long and "pattern" not in attrs and attrs["type"] == "text" else "text"
        default = node["default"] if has_default and isinstance(node["default"], str) else ""
        return Field(**common, widget=widget, kind="string", attrs=attrs, default=default)
    props = node.get("properties")
    if kind in ("object", None) and isinstance(props, Mapping) and props and depth < MAX_DEPTH:
        required_names = node.get("required")
        needed = required_names if isinstance(required_names, list) else []
        children = tuple(_field((*path, n), props[n], n in needed, root, seen, depth + 1) for n in _ordered(node, props))
        return Field(**common, widget="fieldset", kind="object", children=children)
    return Field(**common, widget="json", kind="json", default=_json_default(node))


def build_form(schema: Mapping[str, Any] | None) -> tuple[Field, ...]:
    """The fields of a form for ``schema`` (a JSON Schema dict, or None for free JSON input).

    An object schema with properties gives one field per property (nested
    objects as fieldsets); any other schema gives one field for the whole input.
    """
    if not isinstance(schema, Mapping):
        return (Field(name=field_name(()), path=(), label="Input (JSON)", widget="json", kind="json"),)
    top = _field((), schema, True, schema, frozenset(), 0)
    return top.children if top.widget == "fieldset" else (top,)


def _walk(fields: Sequence[Field]) -> Iterator[Field]:
    for f in fields:
        yield f
        yield from _walk(f.children)


def initial_values(fields: Sequence[Field]) -> dict[str, str]:
    """The raw value each control shows before anything is entered (the schema's defaults)."""
    return {f.name: f.default for f in _walk(fields) if f.widget != "fieldset"}


def _err(path: tuple[str, ...], msg: str) -> dict[str, Any]:
    return {"loc": list(path), "msg": msg}


_MISSING = object()


def _parse_one(f: Field, form: Mapping[str, str], errors: list[dict[str, Any]]) -> Any:
    """The value of ``f`` from ``form``, or ``_MISSING`` when it was left empty and may be left out."""
    if f.kind == "object":
        out: dict[str, Any] = {}
        for child in f.children:
            value = _parse_one(child, form, errors)
            if value is not _MISSING:
                out[child.path[-1]] = value
        touched = any(c.kind != "boolean" and form.get(c.name, "").strip() for c in _walk(f.children))
        return out if (f.required or touched) else _MISSING
    if f.kind == "boolean":
        return f.name in form
    if f.kind == "const":
        return f.const
    raw = form.get(f.name, "")
    if f.kind != "string" and not raw.strip() or f.kind == "string" and raw == "":
        if f.kind == "string" and f.required and not f.nullable:
            return ""  # the schema decides whether an empty string will do (minLength)
        if f.required and f.nullable:
            return None
        if f.required:
            errors.append(_err(f.path, "this field is required"))
        return _MISSING
    if f.kind == "string":
        return raw
    if f.kind == "choice":
        for value, _label in f.options:
            if value == raw:
                return json.loads(value)
        errors.append(_err(f.path, "choose one of the options"))
        return _MISSING
    text = raw.strip()
    if f.kind == "integer":
        if _INTEGER.fullmatch(text):
            return int(text)
        errors.append(_err(f.path, "enter a whole number"))
        return _MISSING
    if f.kind == "number":
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            errors.append(_err(f.path, "enter a number"))
            return _MISSING
        return int(text) if _INTEGER.fullmatch(text) else number
    try:
        return json.loads(text)
    except ValueError as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        errors.append(_err(f.path, f"this is not valid JSON{where}"))
        return _MISSING


def parse_form(fields: Sequence[Field], form: Mapping[str, str]) -> tuple[Any, list[dict[str, Any]]]:
    """``(input, errors)`` from the submitted ``form`` (field name -> raw value).

    ``errors`` lists what does not parse; the input is only good when it is empty.
    """
    errors: list[dict[str, Any]] = []
    if len(fields) == 1 and fields[0].path == ():
        value = _parse_one(fields[0], form, errors)
        return (None if value is _MISSING else value), errors
    top = Field(name=field_name(()), path=(), label="", widget="fieldset", kind="object", required=True, children=tuple(fields))
    return _parse_one(top, form, errors), errors


def errors_by_field(fields: Sequence[Field], errors: Sequence[Mapping[str, Any]], extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """Error messages by the form field they belong to; the rest under ``""`` (shown above the form).

    An error's ``loc`` belongs to the field with the longest path it starts
    with (an error inside a JSON field belongs to that field, prefixed with the
    rest of its path). ``extra`` names fields outside the input (``by``) that a
    one-part ``loc`` may name.
    """
    paths = {f.path: f.name for f in _walk(fields) if f.widget != "fieldset"}
    out: dict[str, list[str]] = {}
    for error in errors:
        loc = tuple(str(p) for p in (error.get("loc") or ()))
        msg = str(error.get("msg") or "invalid value")
        if len(loc) == 1 and loc[0] in extra:
            out.setdefault(loc[0], []).append(msg)
            continue
        owner = next((loc[:n] for n in range(len(loc), -1, -1) if loc[:n] in paths), None)
        name = "" if owner is None else paths[owner]
        rest = loc if owner is None else loc[len(owner) :]
        out.setdefault(name, []).append(f"{'/'.join(rest)}: {msg}" if rest else msg)
    return out
