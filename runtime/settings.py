"""Settings shared by every daemon: the mesh home directory and TOML config files."""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar


class _Settings(Protocol):
    """A settings dataclass: `fields()` lists what a config file may set; `validate()` checks it."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def __init__(self, **values: Any) -> None: ...

    def validate(self) -> None: ...


T = TypeVar("T", bound=_Settings)


def mesh_home() -> Path:
    return Path(os.environ.get("MESH_HOME", Path.home() / ".mesh"))


def load_settings(cls: type[T], path: str | None, table: str, overrides: dict[str, Any]) -> T:
    """Defaults (the dataclass), then the file's [table] (or its top level), then flags that
    were given (None = not given). Unknown settings in the file are an error, not ignored: a
    typo must not silently fall back to a default."""
    values: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path} is not valid TOML: {e}") from None
        data = data.get(table, data)
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
        values.update(data)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise ValueError(f"bad setting: {e}") from None
    cfg.validate()
    return cfg
