"""Experiment configs as nested frozen dataclasses, overridable by ``key=value`` with a type check.

nanoGPT's ``configurator.py`` idea, done with types: every field of a config (and of the specs it
holds: ``model.depth``, ``train.lr``) can be overridden from the command line or from Python,
and the new value is parsed and checked against the field's annotation, so ``seeds=banana``
or ``train.steps=1.5`` is a one-line :class:`ConfigError`, not a crash an hour later::

    cfg = override(SpeedConfig.quick(), ["train.lr=0.3", "seeds=0,1,2"])
    cfg = override(cfg, {"model.depth": 16})

:func:`to_dict` flattens nothing and drops nothing: it is what results are keyed by.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, ClassVar, Iterable, Mapping

__all__ = ["Config", "ConfigError", "override", "to_dict", "config_hash", "fields", "parse_value",
           "format_config"]


class ConfigError(ValueError):
    """A bad override: unknown key, or a value that does not fit the field's type."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Every overridable key of ``cfg`` (dotted for nested dataclasses) → its type."""
    out: dict[str, Any] = {}
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        out[prefix + f.name] = hints[f.name]
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(fields(value, prefix + f.name + "."))
    return out


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def parse_value(text: Any, tp: Any, key: str = "value") -> Any:
    """Parse ``text`` (a string from the command line, or a Python value) as type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
    if tp is Any:
        return text
    if origin in (typing.Union, types.UnionType):
        if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        if isinstance(text, str) and all(dataclasses.is_dataclass(a) for a in args
                                         if a is not type(None)):
            raise ConfigError(f"{key}: set its fields one by one ({key}.FIELD=VALUE)")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(text, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise bad
    if origin is typing.Literal:
        for option in args:
            try:
                if parse_value(text, type(option), key) == option:
                    return option
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected one of {list(args)}, got {text!r}")
    if origin is tuple:
        items = _split(text)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(parse_value(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise bad
        return tuple(parse_value(v, a, key) for v, a in zip(items, args))
    if origin in (dict, Mapping) or tp is dict:
        if isinstance(text, Mapping):
            return dict(text)
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            raise bad from None
        if not isinstance(value, dict):
            raise bad
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(text, tp):
            return text
        raise ConfigError(f"{key}: set its fields one by one ({key}.FIELD=VALUE)")
    if tp is bool:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(text, str) and text.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise bad
    if tp is int:
        if isinstance(text, bool):
            raise bad
        if isinstance(text, int):
            return text
        if isinstance(text, float) and text.is_integer():
            return int(text)
        try:
            return int(str(text).strip())
        except ValueError:
            raise bad from None
    if tp is float:
        if isinstance(text, bool):
            raise bad
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise bad from None
        return value
    if tp is str:
        if not isinstance(text, str):
            raise bad
        return text
    if isinstance(text, tp):
        return text
    raise bad


def _split(text: Any) -> list:
    if isinstance(text, (list, tuple)):
        return list(text)
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return [text]
    if not isinstance(text, str):
        raise ConfigError(f"expected a comma-separated list, got {text!r}")
    body = text.strip().strip("()[]")
    return [v.strip() for v in body.split(",") if v.strip()]


def _set(cfg: Any, path: list[str], value: Any, key: str) -> Any:
    name = path[0]
    names = [f.name for f in dataclasses.fields(cfg)]
    if name not in names:
        close = [n for n in names if n.startswith(name[:3])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown key {key!r} for {type(cfg).__name__}{hint}; "
                          f"keys: {', '.join(names)}")
    if len(path) == 1:
        return dataclasses.replace(cfg, **{name: parse_value(value, _hints(type(cfg))[name], key)})
    inner = getattr(cfg, name)
    if not dataclasses.is_dataclass(inner):
        raise ConfigError(f"{key}: {name!r} has no fields")
    return dataclasses.replace(cfg, **{name: _set(inner, path[1:], value, key)})


def override(cfg: Any, overrides: Mapping[str, Any] | Iterable[str] | None) -> Any:
    """``cfg`` with ``overrides`` applied: a mapping ``{"train.lr": 0.3}`` or strings
    ``["train.lr=0.3", "seeds=0,1"]``. Unknown keys and ill-typed values raise
    :class:`ConfigError` with a one-line message."""
    if not overrides:
        return cfg
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"override {text!r} is not KEY=VALUE")
            k, v = text.split("=", 1)
            items.append((k.strip().lstrip("-").replace("-", "_"), v))
    for key, value in items:
        cfg = _set(cfg, key.split("."), value, key)
    return cfg


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value != value:
        return "nan"
    return value


def to_dict(cfg: Any) -> dict:
    """The config as plain JSON-able data (nested specs as dicts)."""
    return {"_type": type(cfg).__name__, **_plain(cfg)}


def config_hash(cfg: Any) -> str:
    """A short stable hash of a config's values."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def format_config(cfg: Any) -> str:
    """One ``key = value`` line per leaf field, in declaration order (for ``bnlib show``)."""
    lines = []
    for key in fields(cfg):
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if dataclasses.is_dataclass(value):
            continue
        lines.append(f"{key} = {value!r}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every experiment config: the seeds to run and the device to run on.

    The class's defaults are the ``quick`` preset (≤ a minute on 2 CPU cores). ``FULL`` is the
    larger run meant for a GPU, written as overrides of the quick one (dotted keys), so that a
    preset reads as a few assignments, as in nanoGPT's config files.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"

    #: The ``full`` preset as overrides of the quick one; a subclass sets it.
    FULL: ClassVar[Mapping[str, Any] | None] = None

    @classmethod
    def quick(cls) -> "Config":
        return cls()

    @classmethod
    def full(cls) -> "Config":
        if cls.FULL is None:
            raise NotImplementedError(f"{cls.__name__} has no full preset yet")
        return override(cls(), cls.FULL)

    @classmethod
    def preset(cls, scale: str | None = None, **overrides: Any) -> "Config":
        """The ``quick`` or ``full`` preset (default: ``bnlib.scale()``), with overrides
        (dotted keys such as ``"train.lr"`` reach into nested specs)."""
        from . import scale as current_scale
        scale = scale or current_scale()
        if scale not in ("quick", "full"):
            raise ValueError(f"scale must be 'quick' or 'full', got {scale!r}")
        base = cls.quick() if scale == "quick" else cls.full()
        return override(base, overrides) if overrides else base
