"""Config files and their variants, loaded one way.

A config file in ``configs/`` defines ``get_config(arg)``. ``arg`` is the text after the colon of
``--config=configs/cmff.py:cpu,regions``: comma-separated parts, each a named variant of that file (a function
that edits the config) or a ``key=value`` override (``configs/cmff.py:cpu,train.steps=200``), applied left to
right, big_vision style. Overrides go through ml_collections' own ``update_from_flattened_dict`` on a locked
config, so a misspelt key is an error, as it is for ``--config.key=value`` flags.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Callable, Mapping

import ml_collections

Variant = Callable[[ml_collections.ConfigDict], None]


def split_parts(arg: str | None) -> list[str]:
    """``"cpu,data.patch_size=(64,64,64)"`` -> ``["cpu", "data.patch_size=(64,64,64)"]``: commas inside
    brackets belong to the value."""
    parts, depth, current = [], 0, ""
    for char in arg or "":
        depth += char in "([{"
        depth -= char in ")]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [part.strip() for part in parts if part.strip()]


def _parse_value(text: str, old: object) -> object:
    """The command line's text as the type of the value it replaces (a string stays a string)."""
    if isinstance(old, str):
        return text
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _lookup(config: ml_collections.ConfigDict, key: str) -> object:
    node: object = config
    for name in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            raise KeyError(f"{key}: unknown config key")
        node = node[name]
    return node


def override(config: ml_collections.ConfigDict, values: Mapping[str, object]) -> None:
    """Set dotted keys (``{"train.steps": 200}``); an unknown key is a ``KeyError``, a wrong type a ``TypeError``."""
    for key in values:
        _lookup(config, key)
    was_locked = config.is_locked
    config.lock()
    try:
        config.update_from_flattened_dict(dict(values))
    finally:
        if not was_locked:
            config.unlock()


def apply_variants(config: ml_collections.ConfigDict, arg: str | None, variants: Mapping[str, Variant],
                   name: str) -> ml_collections.ConfigDict:
    """Apply the parts of ``arg`` in order: named ``variants`` of ``configs/<name>.py`` and ``key=value``."""
    for part in split_parts(arg):
        if "=" in part:
            key, text = (s.strip() for s in part.split("=", 1))
            override(config, {key: _parse_value(text, _lookup(config, key))})
        elif part in variants:
            variants[part](config)
        else:
            known = ", ".join(sorted(variants)) or "none defined"
            raise ValueError(f"unknown variant {part!r} of configs/{name}.py (known: {known}; or key=value)")
    return config


def _resolve(path: str) -> str:
    """A config path as given, else relative to the checkout that holds this package (an editable install)."""
    if os.path.exists(path):
        return path
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidate = os.path.join(checkout, path)
    if os.path.exists(candidate):
        return candidate
    raise FileNotFoundError(f"{path}: no such config file")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """``load_config("configs/cmff.py:cpu,regions")``: what ``--config=`` loads, from Python (tests, experiments,
    the configs that chain others). A bare job name (``"cmff:smoke"``) means ``configs/<name>.py``."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        path = os.path.join("configs", f"{path}.py")
    path = _resolve(path)
    module_name = "_cmfl_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def sibling(config_file: str, name: str) -> str:
    """The path of ``configs/<name>.py`` beside ``config_file`` (a config's ``__file__``), for chained configs."""
    return os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
