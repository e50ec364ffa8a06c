"""Typed schemas for what the toolkit reads from files, checked at the boundary with one-line errors.

A schema is a tree of specs: `Int`, `Float`, `Str`, `Bool`, `Nullable(spec)`, `ListOf(spec)`, `MapOf(spec)`
and `Obj({key: spec})` (a JSON object; keys with a default may be absent, unknown keys are refused unless
`extra=True`). `dataclass_fields(cls, **specs)` derives the field specs of a dataclass from its annotations
(int, float, str, bool, X | None), replaced by the narrower specs given. Values are never coerced: "32" is not
an integer, 32.0 is not an integer, True is not a number, NaN and inf are not floats (JSON allows them).

`check(value, spec, where)` returns the value or raises SchemaError (a UserError) of one line:
`{where}: {field path} must be {what the spec expects}, got {the value and its type}`.

Why our own: the schemas are a dozen flat records whose fields are typed dataclasses already; a checker that
reads those annotations is about 150 lines, while pydantic (a compiled dependency) coerces "32" to 32 unless
put in strict mode everywhere and reports errors over several lines that would need rewriting anyway.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from hessian_tools.errors import UserError

MAX_SEED = 2**63 - 1


class SchemaError(UserError):
    """A value that does not match its spec: `path` (e.g. "model_config.dim"), `expected`, `got` (None: the key
    is missing)."""

    def __init__(self, path: str, expected: str, got: str | None, where: str | None = None):
        self.path, self.expected, self.got, self.where = path, expected, got, where
        head = f"{where}: " if where else ""
        field = path or ("the file" if where else "the value")
        if got is None:
            super().__init__(f"{head}{field} is missing; it must be {expected}")
        else:
            verb = "must hold" if field == "the file" else "must be"
            super().__init__(f"{head}{field} {verb} {expected}, got {got}")

    def at(self, where: str, prefix: str = "") -> "SchemaError":
        """The same error inside file (or object) `where`, under field `prefix`."""
        path = ".".join(p for p in (prefix, self.path) if p)
        return SchemaError(path, self.expected, self.got, where)


def describe(value) -> str:
    """A value and its JSON type, for messages: '32' (a string), null, NaN, 1e+20 (a float)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, float) and not math.isfinite(value):
        return {True: "NaN"}.get(math.isnan(value), "inf" if value > 0 else "-inf")
    kinds = {str: "a string", int: "an integer", float: "a float", list: "a list", tuple: "a list", dict: "an object"}
    kind = next((name for t, name in kinds.items() if isinstance(value, t)), type(value).__name__)
    shown = repr(value)
    return f"{shown[:60] + '...' if len(shown) > 60 else shown} ({kind})"


class Spec:
    expected = "a value"

    def check(self, value, path: str):
        return value

    def fail(self, value, path: str):
        raise SchemaError(path, self.expected, describe(value))


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class Number(Spec):
    """A bounded number: low <= value <= high (either bound optional; `low_open` / `high_open` make it strict)."""

    noun = "a number"

    def __init__(self, low=None, high=None, low_open: bool = False, high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def in_range(self, value) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    @property
    def expected(self):
        if self.low == 0 and self.high is None:
            return f"a {'positive' if self.low_open else 'non-negative'} {self.noun}"
        low, high = _num(self.low), _num(self.high)
        if self.low is not None and self.high is not None:
            return f"{self.noun} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{self.noun} {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{self.noun} {'<' if self.high_open else '<='} {high}"
        return f"a{'n' if self.noun[0] in 'aeiou' else ''} {self.noun}"


class Int(Number):
    """An integer (not a bool, not a float) within the bounds."""

    noun = "integer"

    @property
    def expected(self):
        if self.low == 1 and self.high is None and not self.low_open:
            return "a positive integer"
        words = super().expected
        return words if words.startswith("a") else f"an {words}"

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, int) or not self.in_range(value):
            self.fail(value, path)
        return value


class Float(Number):
    """A finite number (an int or a float, not a bool) within the bounds."""

    noun = "finite number"

    @property
    def expected(self):
        words = super().expected
        return words if words.startswith("a") else f"a {words}"

    def check(self, value, path):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not self.in_range(value):
            self.fail(value, path)
        return value


class Str(Spec):
    def __init__(self, choices=None, nonempty: bool = False):
        self.choices, self.nonempty = tuple(choices) if choices else None, nonempty

    @property
    def expected(self):
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return "a non-empty string" if self.nonempty else "a string"

    def check(self, value, path):
        if not isinstance(value, str) or (self.choices and value not in self.choices) or (self.nonempty and not value):
            self.fail(value, path)
        return value


class Bool(Spec):
    expected = "true or false"

    def check(self, value, path):
        if not isinstance(value, bool):
            self.fail(value, path)
        return value


class Nullable(Spec):
    def __init__(self, inner: Spec):
        self.inner = inner

    @property
    def expected(self):
        return f"{self.inner.expected} or null"

    def check(self, value, path):
        if value is None:
            return None
        try:
            return self.inner.check(value, path)
        except SchemaError:
            self.fail(value, path)


class ListOf(Spec):
    def __init__(self, item: Spec, length: int | None = None):
        self.item, self.length = item, length

    @property
    def expected(self):
        return f"a list of {self.length or 'any number of'} items, each {self.item.expected}"

    def check(self, value, path):
        if not isinstance(value, (list, tuple)) or (self.length is not None and len(value) != self.length):
            self.fail(value, path)
        return type(value)(self.item.check(v, f"{path}[{i}]") for i, v in enumerate(value))


class MapOf(Spec):
    """An object with string keys, every value `item`."""

    def __init__(self, item: Spec = Spec()):
        self.item = item

    expected = "an object"

    def check(self, value, path):
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            self.fail(value, path)
        return {k: self.item.check(v, _join(path, k)) for k, v in value.items()}


class Obj(Spec):
    """An object with the keys of `fields` ({key: spec}); `optional` keys may be absent; other keys are refused
    unless `extra` (then kept unchecked)."""

    def __init__(self, fields: dict, optional=(), extra: bool = False):
        self.fields, self.optional, self.extra = dict(fields), set(optional), extra

    @property
    def expected(self):
        return "an object with " + ", ".join(self.fields)

    def check(self, value, path):
        if not isinstance(value, dict):
            self.fail(value, path)
        missing = [k for k in self.fields if k not in value and k not in self.optional]
        if missing:
            raise SchemaError(_join(path, missing[0]), self.fields[missing[0]].expected, None)
        unknown = sorted(str(k) for k in value if k not in self.fields)
        if unknown and not self.extra:
            raise SchemaError(path, f"an object with keys among {', '.join(self.fields)}",
                              f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:4])}")
        out = dict(value)
        for key, spec in self.fields.items():
            if key in value:
                out[key] = spec.check(value[key], _join(path, key))
        return out


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


_PLAIN = {int: Int, float: Float, str: Str, bool: Bool}


def spec_of_type(annotation) -> Spec:
    """The spec of a plain annotation: int, float, str, bool, or one of them | None."""
    if annotation in _PLAIN:
        return _PLAIN[annotation]()
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and type(None) in args:
            return Nullable(spec_of_type(inner[0]))
    raise TypeError(f"no spec for annotation {annotation!r}")


def dataclass_fields(cls, **specs) -> dict:
    """{field: spec} of a dataclass: the spec given in `specs`, else the one its annotation implies."""
    hints = typing.get_type_hints(cls)
    unknown = set(specs) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return {f.name: specs.get(f.name) or spec_of_type(hints[f.name]) for f in dataclasses.fields(cls)}


def dataclass_schema(cls, extra: bool = False, **specs) -> Obj:
    """An Obj of a dataclass's fields; a field with a default may be absent."""
    optional = [f.name for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    return Obj(dataclass_fields(cls, **specs), optional=optional, extra=extra)


def check(value, spec: Spec, where: str | None = None, prefix: str = ""):
    """`value` checked against `spec`; SchemaError naming `where` (a file), the field path and the expectation."""
    try:
        return spec.check(value, "")
    except SchemaError as exc:
        raise exc.at(where, prefix) if where is not None or prefix else exc from None


def check_fields(obj, specs: dict):
    """Check the fields of a dataclass instance (e.g. in __post_init__); SchemaError names the field."""
    for name, spec in specs.items():
        spec.check(getattr(obj, name), name)
