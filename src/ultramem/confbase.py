"""The config base every config of the package derives from: typed fields, checked in one place.

A config is a dataclass whose fields carry their type (int, float, bool, str, `Literal[...]`,
`X | None`, a nested config) and, in `field(metadata=...)`, a doc line and range rules made with
`param(...)`. `ConfigBase.__post_init__` checks every field against its type and rules, then
calls the class's own `validate()` for the rules that tie fields together. Every error is
`ValueError("<section.>field: <rule> (got <value>)")`.

Loading (`from_dict`, `from_file`) rejects unknown keys by name and accepts the spellings a
config file or a `--set` override produces: a bool is true/false/1/0 (also as those strings), an
int field takes an integral number, a float field any finite number; a nested config takes a
table. Nothing else is coerced: "no" for a bool, "abc" for a number, null for a table are errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Union  # noqa: UP035

TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")


def param(default=dataclasses.MISSING, doc: str = "", *, ge=None, gt=None, le=None, lt=None,
          default_factory=dataclasses.MISSING) -> Any:
    """A dataclass field with its doc line and range rules (checked by `ConfigBase`)."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fail(field: str, rule: str, value) -> typing.NoReturn:
    raise ValueError(f"{field}: {rule} (got {value!r})")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _members(hint) -> tuple:
    return typing.get_args(hint) if _is_union(hint) else (hint,)


def describe(hint) -> str:
    """'a positive int'-style words for a type hint, for error messages."""
    words = []
    for h in _members(hint):
        if h is type(None):
            words.append("null")
        elif typing.get_origin(h) is Literal:
            words.append("one of " + str(list(typing.get_args(h))))
        elif h is bool:
            words.append("true/false/1/0")
        elif h is int:
            words.append("an int")
        elif h is float:
            words.append("a number")
        elif isinstance(h, type) and issubclass(h, ConfigBase):
            words.append(f"a table of {h.__name__} fields")
        else:
            words.append(getattr(h, "__name__", str(h)))
    return " or ".join(words)


def _matches(value, h) -> bool:
    if h is type(None):
        return value is None
    if typing.get_origin(h) is Literal:
        return value in typing.get_args(h) and not isinstance(value, bool)
    if h is bool:
        return isinstance(value, bool)
    if h is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if h is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    origin = typing.get_origin(h) or h
    if origin is Any:
        return True
    return isinstance(value, origin)


def coerce(value, hint):
    """The loader's spellings -> the field's type (see the module doc); anything else unchanged."""
    members = _members(hint)
    if value is None or any(_matches(value, h) for h in members):
        return value
    for h in members:
        if h is bool:
            if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
                return value.strip().lower() in TRUE_WORDS
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
        if h is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if dataclasses.is_dataclass(h) and issubclass(h, ConfigBase) and isinstance(value, dict):
            return h.from_dict(value)
    return value


class ConfigBase:
    """Mixin for dataclass configs: typed, range-checked fields; dict/JSON/TOML loading."""

    section: ClassVar[str] = ""  # prefix of this config's field names in error messages

    def __post_init__(self):
        self.check_fields()
        self.validate()

    def validate(self) -> None:
        """Rules that tie several fields together (override; raise via `self.fail`)."""

    def fail(self, name: str, rule: str, value) -> typing.NoReturn:
        fail(self.section + name, rule, value)

    @classmethod
    def field_hints(cls) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def check_fields(self) -> None:
        """Every field against its type hint and its `param` rules."""
        meta = {f.name: f.metadata for f in dataclasses.fields(self)}
        for name, hint in self.field_hints().items():
            value = getattr(self, name)
            typed = any(_matches(value, h) for h in _members(hint))
            ranged = not typed or value is None or isinstance(value, bool) or not isinstance(
                value, (int, float)) or _in_range(value, meta[name])
            if not (typed and ranged):
                self.fail(name, "must be " + rule_words(hint, meta[name]), value)

    @classmethod
    def from_dict(cls, d) -> ConfigBase:
        """Build from a plain dict (a config file's table), rejecting unknown keys by name."""
        where = cls.section.rstrip(".") or cls.__name__
        if not isinstance(d, dict):
            fail(where, f"must be a table of {cls.__name__} fields", d)
        hints = cls.field_hints()
        unknown = sorted(set(d) - set(hints))
        if unknown:
            word = "key" if cls.section else "field"  # a file's table has keys; a class has fields
            raise ValueError(f"{where}: unknown {word}(s) {unknown}; allowed {word}s are {sorted(hints)}")
        return cls(**{k: coerce(v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_file(cls, path) -> ConfigBase:
        return cls.from_dict(read_config_file(path))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


def _in_range(value, meta) -> bool:
    return all(meta.get(key) is None or ok(value, meta[key]) for key, _, ok in _BOUNDS)


def rule_words(hint, meta) -> str:
    """The whole rule of a field in words: 'a positive int', 'a number in [0, 1], or null', ..."""
    members = [h for h in _members(hint) if h is not type(None)]
    optional = len(members) < len(_members(hint))
    bounds = [(words, meta[key]) for key, words, _ in _BOUNDS if meta.get(key) is not None]
    if members == [int] and bounds == [(">=", 1)]:
        text = "a positive int"
    else:
        text = " or ".join(describe(h) for h in members)
        if bounds:
            text += " " + " and ".join(f"{w} {b}" for w, b in bounds)
    return text + (", or null for the default" if optional else "")


def read_config_file(path) -> dict:
    """A JSON or TOML (.toml) file's top-level table, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: file not found: '{p}'")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError as e:  # Python 3.10
            raise ValueError(f"--config: TOML needs Python 3.11+ (tomllib); use JSON for '{p}'") from e
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config: '{p}' is not valid TOML: {e}") from e
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config: '{p}' is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"--config: '{p}' must hold a table/object at the top level")
    return d


def field_table(cls) -> str:
    """The markdown table (field | default | meaning) of a config class, for the README."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f"`{json.dumps(f.default) if not isinstance(f.default, str) else repr(f.default)}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{json.dumps(_plain(f.default_factory()))}`"
        else:
            default = "required"
        rows.append(f"| `{f.name}` | {default.replace('|', '/')} | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


def _plain(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return list(x) if isinstance(x, tuple) else x


TABLE_OPEN, TABLE_CLOSE = "<!-- config-table: {name} -->", "<!-- /config-table -->"


def render_field_tables(text: str, classes: dict[str, type]) -> str:
    """`text` with the block between each `<!-- config-table: Name -->` marker and the next
    `<!-- /config-table -->` replaced by `field_table(classes[Name])` (the README's tables)."""
    for name, cls in classes.items():
        start_marker = TABLE_OPEN.format(name=name)
        start = text.find(start_marker)
        if start < 0:
            raise ValueError(f"render_field_tables: no '{start_marker}' marker in the text")
        body_start = start + len(start_marker)
        end = text.find(TABLE_CLOSE, body_start)
        if end < 0:
            raise ValueError(f"render_field_tables: '{start_marker}' has no closing '{TABLE_CLOSE}'")
        text = text[:body_start] + "\n" + field_table(cls) + "\n" + text[end:]
    return text
