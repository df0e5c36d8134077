"""The one configuration loader: frozen dataclasses from mappings and YAML files, checked field by field.

``blip train``, ``blip md`` and ``blip learn`` describe their settings as frozen dataclasses
(nested sections are dataclasses too). :func:`from_dict` builds one from a plain mapping (YAML,
JSON, a checkpoint's stored config) and checks every value against its annotation:

- an unknown key is refused, and the message lists the allowed ones;
- a ``Literal`` field takes one of its choices only;
- ``int`` fields take integers, never ``True``/``False``; ``float`` fields take finite numbers
  (integers become floats); ``bool`` fields take ``true``/``false``; ``str`` fields take text;
- ``list[...]``, ``tuple[...]`` and ``dict[...]``/``Mapping[...]`` are checked element by element,
  ``X | None`` takes ``null`` or an ``X``, and nested dataclasses are built recursively.

:func:`with_overrides` changes fields of a built configuration through the same checks, and
:func:`load_yaml` reads a file, resolves its relative path fields against the file's directory
and applies overrides. Path fields are declared with ``metadata=PATH``::

    @dataclass(frozen=True)
    class Section:
        weights_path: str | None = field(default=None, metadata=PATH)

Range checks belong in the dataclass's ``__post_init__`` (it runs on every construction, from
Python as from a file); :func:`checked_int` is the one integer check they share.

Every bad value is a ``ValueError`` (never a ``TypeError``: it is bad input, reported as one line
by the command line) naming the key (``config.yaml.optim.lr``) and the problem.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

__all__ = ["PATH", "checked_int", "from_dict", "is_path", "load_yaml", "with_overrides"]

PATH: types.MappingProxyType = types.MappingProxyType({"path": True})
"""Field metadata of a path: :func:`load_yaml` resolves a relative value against the file's directory."""

_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
_SEQUENCES = (list, collections.abc.Sequence, collections.abc.MutableSequence)


class _Mismatch(ValueError):
    """A value of the wrong kind for its annotation (a union then tries its other options)."""


def checked_int(value: Any, *, least: int | None = None, name: str) -> int:
    """``value`` as an ``int`` if it is an integer (``True``/``False`` are not) ``>= least``.

    Args:
        value: the value to check; numpy integers are accepted.
        least: smallest allowed value (None: any integer).
        name: the setting's name, for the message.

    Raises:
        ValueError: ``"{name} must be an integer >= {least}, got {value!r}"``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (least is not None and value < least):
        bound = "" if least is None else f" >= {least}"
        raise ValueError(f"{name} must be an integer{bound}, got {value!r}")
    return int(value)


def is_path(f: dataclasses.Field) -> bool:
    """Whether dataclass field ``f`` is declared a path (``metadata=PATH``)."""
    return bool(f.metadata.get("path"))


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass ``cls`` from the mapping ``data``; nested dataclasses recursively.

    Args:
        cls: a dataclass type.
        data: its fields by name; missing ones keep their defaults.
        where: the name of ``data`` in messages (a file name, ``train.config``); ``""`` names
            the keys alone.

    Raises:
        ValueError: a non-mapping ``data``, an unknown key (the message lists the allowed ones),
            a value of the wrong type or outside its choices (the message names the key), or
            whatever ``cls.__post_init__`` refuses.
    """
    if not isinstance(data, collections.abc.Mapping):
        kind = type(data).__name__
        raise ValueError(f"{where or 'the configuration'} must be a mapping, got {kind}")  # noqa: TRY004
    fields = _check_keys(cls, data, where)
    hints = typing.get_type_hints(cls)
    kwargs = {key: _field_value(fields[key], hints[key], value, _join(where, key)) for key, value in data.items()}
    return _construct(lambda: cls(**kwargs), where)


def with_overrides(cfg: Any, overrides: Any, where: str = "overrides") -> Any:
    """Copy of dataclass instance ``cfg`` with ``overrides`` applied through the checks of :func:`from_dict`.

    A mapping given for a nested dataclass changes only the fields it names
    (``{"bayes": {"kl_weight": 1.0}}`` keeps the other ``bayes`` settings).

    Raises:
        ValueError: as :func:`from_dict`, with keys named ``{where}.{key}``.
    """
    if not isinstance(overrides, collections.abc.Mapping):
        raise ValueError(f"{where or 'overrides'} must be a mapping, got {type(overrides).__name__}")  # noqa: TRY004
    fields = _check_keys(type(cfg), overrides, where)
    hints = typing.get_type_hints(type(cfg))
    changes = {}
    for key, value in overrides.items():
        current, name = getattr(cfg, key), _join(where, key)
        if dataclasses.is_dataclass(current) and isinstance(value, collections.abc.Mapping):
            changes[key] = with_overrides(current, value, name)
        else:
            changes[key] = _field_value(fields[key], hints[key], value, name)
    return _construct(lambda: dataclasses.replace(cfg, **changes), where)


def load_yaml(path: str | Path, cls: type, overrides: Any = None) -> Any:
    """Read the YAML file ``path`` into dataclass ``cls``.

    Relative values of path fields (``metadata=PATH``, at any depth) are resolved against the
    file's directory (``~`` is expanded), so a config works from any working directory.
    ``overrides`` (a nested mapping, see :func:`with_overrides`) are applied afterwards, as given.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not valid YAML or not a mapping, or as :func:`from_dict`.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping, got {type(data).__name__}")  # noqa: TRY004
    cfg = from_dict(cls, _resolve_paths(cls, data, path.resolve().parent), where=str(path))
    return with_overrides(cfg, overrides, "overrides") if overrides else cfg


# ---------------------------------------------------------------------------------------- internals


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _check_keys(cls: type, data: collections.abc.Mapping, where: str) -> dict[str, dataclasses.Field]:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        place = f" in {where}" if where else ""
        raise ValueError(f"unknown key(s) {unknown}{place}; allowed: {list(fields)}")
    return fields


def _construct(build: typing.Callable[[], Any], where: str) -> Any:
    """``build()``; a ``ValueError`` of the dataclass's own checks is prefixed with ``where``."""
    try:
        return build()
    except ValueError as exc:
        if not where:
            raise
        raise ValueError(f"{where}: {exc}") from None


def _field_value(f: dataclasses.Field, tp: Any, value: Any, where: str) -> Any:
    if is_path(f) and isinstance(value, os.PathLike):
        value = os.fspath(value)
    return _inner(tp, value, where)


def _inner(tp: Any, value: Any, where: str) -> Any:
    """:func:`_convert` of a part of a value: its mismatch is final, not one a union may try to match."""
    try:
        return _convert(tp, value, where)
    except _Mismatch as exc:
        raise ValueError(str(exc)) from None


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if _is_dataclass_type(tp) or tp in _MAPPINGS or origin in _MAPPINGS:
        return "a mapping"
    if tp in (*_SEQUENCES, tuple) or origin in (*_SEQUENCES, tuple):
        return "a list"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _mismatch(tp: Any, value: Any, where: str) -> _Mismatch:
    hint = ""
    if isinstance(value, str) and float in (tp, *typing.get_args(tp)) and _is_number_text(value):
        hint = f" (text: YAML reads a number without a dot, such as 1e-3, as text; write {float(value)!r})"
    return _Mismatch(f"{where} must be {_describe(tp)}, got {value!r}{hint}")


def _is_number_text(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _convert(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against annotation ``tp`` (and converted: lists to tuples, ints to floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _mismatch(tp, value, where)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch(f"{where} must be one of {list(args)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        return _convert_union(tp, args, value, where)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if value is None:  # an empty YAML section (``bayes:`` with every line commented out)
            value = {}
        if not isinstance(value, collections.abc.Mapping):
            raise _mismatch(tp, value, where)
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(tp, value, where)
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _mismatch(tp, value, where)
    if tp is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _mismatch(tp, value, where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _mismatch(tp, value, where)
    if tp in _MAPPINGS or origin in _MAPPINGS:
        if not isinstance(value, collections.abc.Mapping):
            raise _mismatch(tp, value, where)
        if not args:
            return value
        key_tp, value_tp = args
        return {_inner(key_tp, k, where): _inner(value_tp, v, _join(where, str(k))) for k, v in value.items()}
    if tp is tuple or origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            raise _mismatch(tp, value, where)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_inner(args[0], v, _join(where, k)) for k, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{where} must list {len(args)} values, got {len(value)}: {list(value)!r}")
        return tuple(_inner(a, v, _join(where, k)) for k, (a, v) in enumerate(zip(args, value)))
    if tp in _SEQUENCES or origin in _SEQUENCES:
        if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Sequence):
            raise _mismatch(tp, value, where)
        if not args:
            return list(value)
        return [_inner(args[0], v, _join(where, k)) for k, v in enumerate(value)]
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _mismatch(tp, value, where)
    return value


def _convert_union(tp: Any, args: tuple, value: Any, where: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _mismatch(tp, value, where)
    options = [a for a in args if a is not type(None)]
    for option in options:
        try:
            return _convert(option, value, where)
        except _Mismatch:
            if len(options) == 1:  # ``X | None``: the message names null as the other choice
                raise _mismatch(tp, value, where) from None
    raise _mismatch(tp, value, where)


def _resolve_paths(cls: type, data: dict, base: Path) -> dict:
    """``data`` with the relative values of ``cls``'s path fields joined to ``base`` (nested sections too)."""
    hints = typing.get_type_hints(cls)
    out = dict(data)
    for f in dataclasses.fields(cls):
        if f.name not in out:
            continue
        value = out[f.name]
        if is_path(f):
            if isinstance(value, str):
                out[f.name] = _resolve(value, base)
            elif isinstance(value, list):
                out[f.name] = [_resolve(v, base) if isinstance(v, str) else v for v in value]
            continue
        section = _section_type(hints[f.name])
        if section is not None and isinstance(value, dict):
            out[f.name] = _resolve_paths(section, value, base)
    return out


def _section_type(tp: Any) -> type | None:
    """The dataclass of a field annotated ``Section`` or ``Section | None``, else None."""
    if _is_dataclass_type(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if _is_dataclass_type(a)]
        return inner[0] if len(inner) == 1 else None
    return None


def _resolve(value: str, base: Path) -> str:
    """``FILE`` (or ``FILE@INDEX``) relative to ``base`` unless absolute; ``~`` expanded."""
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)
