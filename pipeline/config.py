"""Stage configs: dataclasses filled from a YAML file, then `--key value` command-line overrides.

Keys are strict: an unknown key is an error that names the key, the file, and the closest valid key. A
setting that was renamed is refused with its new name: a config class lists its old names in a `RENAMED`
class attribute ({"old": "new"}). Nested dataclass fields are set with a YAML mapping or a dotted key
(`--lora.r 8`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pipeline.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that cannot be applied; the message names the key and the fix."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from an optional YAML file and `--key value` / `--key=value` overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
        values = loaded or {}
    for key, raw in parse_overrides(overrides):
        set_dotted(values, key, yaml.safe_load(raw) if raw != "" else "")
    return build(cls, values, source)


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """Turn ["--a", "1", "--b=2", "--flag"] into [("a", "1"), ("b", "2"), ("flag", "true")]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected an override like --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            raw = args[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        pairs.append((key.replace("-", "_"), raw))
    return pairs


def set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        values = values.setdefault(key, {})
    values[keys[-1]] = value


def renamed_keys(cls: type) -> dict[str, str]:
    """Old setting name -> new name, from the class's optional `RENAMED` attribute."""
    return vars(cls).get("RENAMED", {})


def build(cls: type[T], values: dict[str, Any], source: str, prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in values:
        new = renamed_keys(cls).get(key)
        if new is not None:
            raise ConfigError(
                f"{source}: {prefix + key!r} was renamed to {prefix + new!r}; write {prefix + new} instead "
                f"(--{prefix + new} on the command line)"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"{source}: unknown key {prefix + key!r} for {cls.__name__}{hint}")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = coerce(hints[key], value, f"{prefix}{key}", source)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None


def coerce(annotation: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type; accept ints for floats and scalars for strings."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return build(annotation, value, source, prefix=f"{key}.")
        raise ConfigError(f"{source}: {key} must be a mapping of {annotation.__name__} fields")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(option, value, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            value = [value]
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        return [coerce(item_type, item, key, source) for item in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping; got {value!r}")
        return value
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{source}: {key} must be {annotation.__name__}; got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data, for the artifact manifest."""
    return dataclasses.asdict(config)
