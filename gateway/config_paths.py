"""Paths in a configuration file resolve relative to the file (not the working folder).

:func:`resolve_relative_paths` rewrites a YAML document before validation: every value
that the settings model types as a path (``Path``, ``FilePath``, ``DirectoryPath``,
optional or in lists and dicts of them, in nested sections) and the file of a relative
``sqlite:///`` database URL are made absolute against the file's folder. The model's
annotations say which values are paths, so a new path setting needs no list kept here.
Values from ``BASTION_*`` variables and command-line options are not touched (they are
relative to where the command runs, as a shell user expects).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from compliance.config_paths import resolve_database_url, resolve_path

DATABASE_URL_FIELDS = ("database_url",)


def resolve_relative_paths(
    model: type[BaseModel], document: dict[str, Any], base: Path
) -> dict[str, Any]:
    """A copy of ``document`` with its relative paths made absolute against ``base``."""
    out = dict(document)
    for name, info in model.model_fields.items():
        if name not in out or out[name] is None:
            continue
        if name in DATABASE_URL_FIELDS and isinstance(out[name], str):
            out[name] = resolve_database_url(out[name], base)
            continue
        out[name] = _resolve(info.annotation, out[name], base)
    return out


def _resolve(annotation: Any, value: Any, base: Path) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _resolve(args[0], value, base)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            resolved = _resolve(arg, value, base)
            if resolved is not value:
                return resolved
        return value
    if origin in (list, tuple, set, frozenset) and isinstance(value, list):
        return [_resolve(args[0] if args else Any, item, base) for item in value]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return {key: _resolve(args[1], item, base) for key, item in value.items()}
    if isinstance(annotation, type):
        if issubclass(annotation, Path) and isinstance(value, str | Path):
            return str(resolve_path(value, base))
        if issubclass(annotation, BaseModel) and isinstance(value, dict):
            return resolve_relative_paths(annotation, value, base)
    return value
