"""Every command in the README and docs/ names modules, config files, variants and config keys that exist.

Commands are read from the fenced code blocks (backslash continuations joined); config overrides written
inline in the text (`` `--config.data.split.folds=0` ``) must exist in at least one job's config.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex

import ml_collections
import pytest

from tests.conftest import REPO

DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def load_config(path: str, variant: str | None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_doc_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def code_commands(path: str) -> list[str]:
    """Shell lines of the fenced blocks of a Markdown file that run Python or the console command."""
    text = open(path).read()
    commands = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if re.search(r"python3? -m |cmfl-jax ", line):
                commands.append(line)
    return commands


def all_commands() -> list[tuple[str, str]]:
    return [(os.path.relpath(p, REPO), c) for p in DOCS for c in code_commands(p)]


def python_invocations(command: str) -> list[list[str]]:
    """The argument lists after ``python -m`` / ``cmfl-jax`` in one shell line (``&&`` and ``;`` split commands;
    a quoted command, as ``ssh ... --command="..."`` passes it, is read as well)."""
    words = []
    for word in shlex.split(command.replace("[", "").replace("]", "")):
        words += [w for w in re.split(r"(&&|;)", word) if w] if "=" not in word.split(" ")[0] else [word]
    flat = []
    for word in words:
        flat += shlex.split(word.split("=", 1)[1]) if word.startswith("--command=") else [word]
    out, current = [], []
    for word in [*flat, "&&"]:
        if word in ("&&", ";"):
            out += _after_python(current)
            current = []
        else:
            current.append(word)
    return out


def _after_python(words: list[str]) -> list[list[str]]:
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i - 1].endswith(("python", "python3")):
            return [words[i + 1 :]]
        if word.endswith("cmfl-jax"):
            return [["cmfl_jax.main", *words[i + 1 :]]]
    return []


COMMANDS = all_commands()


def test_the_docs_hold_commands():
    names = {c.split()[0] for _, c in COMMANDS}
    assert len(COMMANDS) >= 15 and any("cmfl_jax.main" in c for _, c in COMMANDS), names


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_command_names_what_exists(doc, command):
    for args in python_invocations(command):
        module, rest = args[0], args[1:]
        if module in ("venv", "pip", "pytest"):
            continue
        if module.startswith("experiments."):
            path = os.path.join(REPO, *module.split(".")) + ".py"
            assert os.path.isfile(path), f"{doc}: {module} does not exist"
            source = open(path).read()
            for flag in (a.split("=")[0] for a in rest if a.startswith("--")):
                assert f'"{flag}"' in source, f"{doc}: {module} has no flag {flag}"
            continue
        assert importlib.util.find_spec(module) is not None, f"{doc}: module {module} does not exist"
        if module != "cmfl_jax.main":
            continue
        config_arg = next((a for a in rest if a.startswith("--config=")), None)
        assert config_arg, f"{doc}: {command} has no --config="
        path, _, variant = config_arg.split("=", 1)[1].partition(":")
        assert os.path.isfile(os.path.join(REPO, path)), f"{doc}: {path} does not exist"
        config = load_config(os.path.join(REPO, path), variant or None)
        for arg in rest:
            if arg.startswith("--config."):
                key = arg[len("--config."):].split("=")[0]
                assert has_key(config, key), f"{doc}: {path}{':' + variant if variant else ''} has no key {key}"


def test_inline_overrides_name_existing_keys():
    configs = [load_config(p, None) for p in CONFIG_FILES]
    for doc in DOCS:
        for key in sorted({k.rstrip(".") for k in re.findall(r"--config\.([a-z_][a-z0-9_.]*)", open(doc).read())}):
            assert any(has_key(c, key) for c in configs), f"{os.path.relpath(doc, REPO)}: no config has key {key}"


def test_the_checker_catches_a_wrong_key():
    config = load_config(os.path.join(REPO, "configs", "cmff.py"), "smoke")
    assert has_key(config, "init.cmft_workdir") and not has_key(config, "init.cmft_dir")
    assert python_invocations("a && .venv/bin/python -m cmfl_jax.main --config=configs/cmff.py --config.x=1") == [
        ["cmfl_jax.main", "--config=configs/cmff.py", "--config.x=1"]]
    assert python_invocations('ssh h --command="cd x && python -m cmfl_jax.main --config=c.py --config.y=2"') == [
        ["cmfl_jax.main", "--config=c.py", "--config.y=2"]]
