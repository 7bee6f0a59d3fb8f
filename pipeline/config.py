"""Typed configuration from flat TOML files (stdlib tomllib) into frozen dataclasses.

Unknown keys and wrongly typed values fail naming the file, the key and the allowed keys.
TOML has no null: the string "none" stands for None where a field
allows it.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

from data import spec
from data.errors import CxrError

T = TypeVar("T")


class ConfigError(CxrError, ValueError):
    """A configuration file or value that cannot be used; names the file and key."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; ConfigError naming the file on syntax errors."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from None


def build_settings(cls: type[T], values: Mapping[str, Any], *, source: str = "<config>",
                   required: tuple[str, ...] = ()) -> T:
    """Instantiate dataclass ``cls`` from ``values`` with key and type checks.

    Raises ConfigError listing the allowed keys for unknown ones and the missing ones
    for ``required``; the dataclass's own validation errors are re-raised with ``source``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"{source}: missing key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{source}: {k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{source}: {err}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and isinstance(value, str) and value.lower() == "none":
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{where}: {value!r} does not fit {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, where) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(v, args[1], where) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def settings_to_toml(values: Mapping[str, Any]) -> str:
    """Flat mapping → TOML text (for the resolved config written into run directories)."""
    lines = []
    tables = []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, table in tables:
        lines.append(f"\n[{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """Limits and behaviour of `cxr serve` (the command line's defaults are these)."""

    max_upload_bytes: int = 64 * 1024 * 1024  # DICOM files of full-size detectors reach tens of MB
    max_batch: int = 8
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for others
    max_queue: int = 64  # requests waiting beyond this get 503 (retry later)
    segment_all: bool = False  # stage 2 on every image (audits), not only pneumonia/covid
    result_ttl_s: float = 3600.0
    max_results: int = 128  # results kept in memory; the oldest go first
    max_result_bytes: int = 256 * 1024 * 1024  # and their PNGs together stay under this
    max_pixels: int = spec.DEFAULT_MAX_PIXELS  # larger uploads get 422, judged from the header
    request_timeout_s: float = 60.0  # headers and body must arrive within this (slow clients are cut off)
