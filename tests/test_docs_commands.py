"""Every command in the README and docs/ names modules, config files, variants, keys, flags and values that exist.

Commands are read from every fenced code block (backslash continuations joined). For ``cmfl_jax.main`` the config
file is loaded with its variant, and each ``--config.key=value`` is applied to it as the command line would (an
unknown key or a value of the wrong type fails); any other module's arguments go through that module's own
argparse parser (an unknown flag, a bad choice or type fails). Overrides written inline in the text
(`` `--config.data.split.folds=0` ``) must fit a config the same paragraph names (or, failing that, the last one
named above it in the same section).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import runpy
import shlex
import sys
from unittest import mock

import ml_collections
import pytest

from cmfl_jax.config_variants import _lookup, _parse_value, load_config, override
from tests.conftest import REPO

DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
NOT_CHECKED = ("venv", "pip", "pytest")  # their own flags


def code_commands(path: str) -> list[str]:
    """Shell lines of every fenced block of a Markdown file that run Python or the console command."""
    commands = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", open(path).read(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("`"):
                continue  # Markdown shown as a program's output, quoting a command
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


class _Parsed(Exception):
    pass


def parse_module_args(module: str, args: list[str]) -> argparse.Namespace:
    """``args`` parsed by the argparse parser ``python -m module`` builds, stopping before the module does any
    work; a rejected argument raises ``SystemExit``."""
    original = argparse.ArgumentParser.parse_args
    seen = {}

    def parse_and_stop(self, argv=None, namespace=None):
        seen["namespace"] = original(self, argv, namespace)
        raise _Parsed

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop), \
            mock.patch.object(sys, "argv", [module, *args]):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        except _Parsed:
            return seen["namespace"]
    raise AssertionError(f"python -m {module} parsed no arguments with argparse")


def check_main_command(args: list[str]) -> None:
    config_arg = next((a for a in args if a.startswith("--config=")), None)
    assert config_arg, "no --config="
    spec = config_arg.split("=", 1)[1]
    assert os.path.isfile(os.path.join(REPO, spec.partition(":")[0])), f"{spec}: no such config file"
    config = load_config(spec)
    for arg in args:
        if arg.startswith("--config."):
            key, _, value = arg[len("--config."):].partition("=")
            override(config, {key: _parse_value(value, _lookup_or_fail(config, key, spec))})


def _lookup_or_fail(config: ml_collections.ConfigDict, key: str, spec: str) -> object:
    try:
        return _lookup(config, key)
    except KeyError:
        raise AssertionError(f"{spec} has no key {key}") from None


COMMANDS = all_commands()


def test_the_docs_hold_commands():
    names = {c.split()[0] for _, c in COMMANDS}
    assert len(COMMANDS) >= 15 and any("cmfl_jax.main" in c for _, c in COMMANDS), names


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{i}" for i, (d, _) in enumerate(COMMANDS)])
def test_command_names_what_exists(doc, command):
    for args in python_invocations(command):
        module, rest = args[0], args[1:]
        if module in NOT_CHECKED:
            continue
        if module == "cmfl_jax.main":
            check_main_command(rest)
        else:
            parse_module_args(module, rest)


def inline_overrides(text: str) -> list[tuple[str, str, list[str]]]:
    """``(key, value, configs in context)`` for each inline `` `--config.key=value` `` of a document: the configs
    its paragraph names, and those of the last command block of its section (or of the last paragraph above that
    named one)."""
    config_name = r"configs/([a-z_]+\.py(?::[a-z0-9_,.=]+)?)"
    found, section = [], []
    blocks = re.findall(r"```.*?```", text, flags=re.S)
    for i, segment in enumerate(re.split(r"```.*?```", text, flags=re.S)):
        for paragraph in re.split(r"\n\s*\n", segment):
            if paragraph.lstrip().startswith("#"):
                section = []  # a new section
            here = re.findall(config_name, paragraph)
            for key, value in re.findall(r"--config\.([a-z_][a-z0-9_.]*[a-z0-9_])(?:=([^`\s]*))?", paragraph):
                found.append((key, value, sorted(set(here + section))))
            section = section or here
        if i < len(blocks):
            section = re.findall(config_name, blocks[i]) or section
    return found


def inline_fits(key: str, value: str, named: list[str]) -> bool:
    for spec in named or [os.path.basename(p) for p in sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))]:
        config = load_config(os.path.join(REPO, "configs", spec))
        try:
            old = _lookup_or_fail(config, key, spec)
            if value:
                override(config, {key: _parse_value(value, old)})
            return True
        except (AssertionError, KeyError, TypeError, ValueError):
            continue
    return False


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, REPO) for d in DOCS])
def test_inline_overrides_fit_the_config_they_are_written_for(doc):
    wrong = [f"--config.{k}={v} ({', '.join(n) or 'no config named'})"
             for k, v, n in inline_overrides(open(doc).read()) if not inline_fits(k, v, n)]
    assert not wrong, f"{os.path.relpath(doc, REPO)}: {wrong}"


def test_the_checker_catches_wrong_keys_values_and_flags():
    check_main_command(["--config=configs/cmff.py:smoke", "--config.init.cmft_workdir=x", "--config.train.steps=3"])
    with pytest.raises(AssertionError, match=r"has no key init\.cmft_dir"):
        check_main_command(["--config=configs/cmff.py:smoke", "--config.init.cmft_dir=x"])
    with pytest.raises(TypeError):
        check_main_command(["--config=configs/cmff.py", "--config.train.steps=many"])
    with pytest.raises(ValueError, match="unknown variant 'tiny'"):
        check_main_command(["--config=configs/cmff.py:tiny"])
    assert parse_module_args("experiments.ablations", ["--seeds", "0", "1"]).seeds == [0, 1]
    with pytest.raises(SystemExit):
        parse_module_args("experiments.ablations", ["--no-such-flag"])
    with pytest.raises(SystemExit):
        parse_module_args("experiments.ablations", ["--seeds", "zero"])
    # an inline key is held against the config its paragraph names, not any config
    assert inline_overrides("Run `configs/predict.py` with `--config.mirror=true`.") == [
        ("mirror", "true", ["predict.py"])]
    assert inline_overrides("```\npython -m cmfl_jax.main --config=configs/cmff.py\n```\n\nSee `configs/cmft.py`."
                            "\n\nWith `--config.val.every=3`.")[0][2] == ["cmff.py"]
    assert inline_fits("mirror", "true", ["predict.py"]) and not inline_fits("mirror", "true", ["cmft.py"])
    assert not inline_fits("train.steps", "lots", ["cmff.py"])
    assert python_invocations("a && .venv/bin/python -m cmfl_jax.main --config=configs/cmff.py --config.x=1") == [
        ["cmfl_jax.main", "--config=configs/cmff.py", "--config.x=1"]]
    assert python_invocations('ssh h --command="cd x && python -m cmfl_jax.main --config=c.py --config.y=2"') == [
        ["cmfl_jax.main", "--config=c.py", "--config.y=2"]]


MEMORY_SOURCES = ("memory analysis", "measured on", "CPU compile")


def unsourced_gpu_memory_claims(text: str) -> list[str]:
    """Sentences that put a memory figure (GiB, GB) beside a GPU without saying where the figure comes from: the
    development machine has no GPU, so such a figure is XLA's memory analysis of a CPU compile, or a measurement
    on a named machine."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    sentences = re.split(r"(?<=[.;])\s+", re.sub(r"\s+", " ", prose))
    return [s for s in sentences if re.search(r"\d\s?(GiB|GB)\b", s) and re.search(r"(?<!no )(?<!no-)\bGPUs?\b", s)
            and not any(source in s for source in MEMORY_SOURCES)]


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(d, REPO) for d in DOCS])
def test_gpu_memory_figures_name_their_source(doc):
    assert not unsourced_gpu_memory_claims(open(doc).read())


def test_the_memory_check_catches_a_bare_claim():
    assert unsourced_gpu_memory_claims("The step needs about 7 GiB, so batch 1 fits a 16 GB GPU. Next.") == [
        "The step needs about 7 GiB, so batch 1 fits a 16 GB GPU."]
    assert not unsourced_gpu_memory_claims("XLA's memory analysis of a CPU compile says 7 GiB; a GPU may differ.")
    assert not unsourced_gpu_memory_claims("The machine: 2 cores, 24 GiB, no GPU.")
