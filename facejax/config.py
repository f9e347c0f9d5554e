"""Load `get_config()` files and apply `--config.a.b=value` overrides with type checks."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import numbers
import os
from collections.abc import Sequence

import ml_collections

from facejax import limits
from facejax.errors import ConfigError

_PREFIX = "--config."


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path.py` or `path.py:arg` and applies `a.b=value` overrides.

    Unknown keys and values of the wrong type raise ConfigError with a suggestion.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"_facejax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # a user's config file can fail in any way; report it in one line
        raise ConfigError(f"could not load config {path}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # a user's get_config can fail in any way (or reject its argument)
        raise ConfigError(f"get_config() in {path} failed"
                          f"{f' for argument {arg!r}' if arg else ''}: "
                          f"{type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {path} must return an ml_collections.ConfigDict, "
                          f"got {type(config).__name__}")
    check_renamed(config, f"get_config() in {path}")
    for item in overrides:
        apply_override(config, item)
    check_limits(config)
    return config


def _renamed_note(key: str) -> str:
    """'config key OLD was renamed NEW: ...' when `key` is a renamed setting's old name, else ''."""
    from facejax.rundir import RENAMED  # rundir imports this module

    new = RENAMED.get(key)
    return f"config key {key!r} was renamed {new!r}: set {new} instead" if new else ""


def check_renamed(config: ml_collections.ConfigDict, where: str) -> None:
    """ConfigError when `config` (a config file's) sets a setting under its old name
    (rundir.RENAMED), which would otherwise be ignored."""
    from facejax.rundir import RENAMED

    for old in RENAMED:
        if has_key(config, old):
            raise ConfigError(f"{where} sets {_renamed_note(old)}")


def split_override_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) arguments from the rest."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith(_PREFIX):
            body = a[len(_PREFIX):]
            if "=" not in body:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{a} needs a value: {a}=VALUE")
                body = f"{body}={argv[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            rest.append(a)
        i += 1
    return overrides, rest


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"override {item!r} must look like a.b=value")
    parts = key.split(".")
    node = config
    for depth, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
            if _renamed_note(key):
                raise ConfigError(_renamed_note(key))
            hint = difflib.get_close_matches(part, keys, n=1)
            where = ".".join(parts[:depth]) or "config"
            msg = f"unknown config key {key!r}: {where} has no field {part!r}"
            if hint:
                msg += f" (did you mean {hint[0]!r}?)"
            raise ConfigError(msg)
        if depth < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    value = _coerce(key, raw, old)
    limits.check_size(key, value)
    node[parts[-1]] = value


def _coerce(key: str, raw: str, old):
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"{key} is a group of settings; set one of its fields instead")
    if isinstance(old, bool):
        low = raw.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} expects true or false, got {raw!r}")
    if isinstance(old, str) or old is None:
        if old is None:
            try:
                return ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"{key} expects {type(old).__name__}, got {raw!r}") from None
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, (tuple, list)):
        items = list(value) if isinstance(value, (tuple, list)) else [value]
        kinds = {type(v) for v in old}
        if len(kinds) == 1 and items:
            (kind,) = kinds
            if kind is float:
                items = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v
                         for v in items]
            bad = [v for v in items if type(v) is not kind]
            if bad:
                raise ConfigError(f"{key} expects a sequence of {kind.__name__}, got {raw!r}")
        if len(old) and len(items) != len(old) and len(kinds) > 1:
            raise ConfigError(f"{key} expects {len(old)} values, got {raw!r}")
        return type(old)(items)
    if type(value) is not type(old):
        raise ConfigError(f"{key} expects {type(old).__name__}, got {raw!r}")
    return value


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    """Whether `config` has the (possibly nested) field `a.b.c`."""
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def get_key(config: ml_collections.ConfigDict, dotted: str, default=None):
    """The value of the (possibly nested) field `a.b.c`, or `default` when it is missing."""
    if not has_key(config, dotted):
        return default
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def check_limits(config: ml_collections.ConfigDict) -> None:
    """Refuses size-like settings above their bounds (`facejax.limits.SIZE_LIMITS`) and batches
    whose input alone cannot fit in this machine's memory, before anything is allocated.

    Raises:
      ConfigError: naming the setting to lower.
    """
    for key in limits.SIZE_LIMITS:
        if has_key(config, key):
            limits.check_size(key, get_key(config, key))
    side = max(_int(get_key(config, "data.image_size", 0)),
               _int(get_key(config, "model.input_size", 0)))
    if not side:
        return
    # Lower bounds of the real need (the model's activations come on top): what certainly
    # cannot fit is refused now rather than by the OOM killer.
    batch = _int(get_key(config, "train.batch_size", 0))
    if batch > 0:
        limits.check_memory(batch * side * side * 3 * 4,
                            f"a training batch of {batch} float32 images of {side}x{side}",
                            "lower train.batch_size or data.image_size / model.input_size")
    batch = _int(get_key(config, "index.embed_batch_size", 0))
    if batch > 0:
        limits.check_memory(batch * side * side * 3 * 5,
                            f"an embedding batch of {batch} images of {side}x{side}",
                            "lower index.embed_batch_size or data.image_size / model.input_size")


def _int(value) -> int:
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else 0


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)
