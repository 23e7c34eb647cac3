"""CMFF's start from a CMFT run (section 4.1): find the run, check it, restore its generators, graft them.

S_A and S_B take every layer of the generators but the last (``head``): G_AB and G_BA for "cmft" (Table 4's
"Ours"), the self-reconstruction G_AA and G_BB for "self" ("Ours_self"); "random" starts from scratch.
S_F always starts at random. Every failure is one clear :class:`~cmfl_jax.errors.CMFLError`, raised before any
data is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from cmfl_jax import checkpoints
from cmfl_jax.errors import CMFLError
from cmfl_jax.models import builder

# config.init.mode -> the CMFT checkpoint items that become (S_A, S_B).
INIT_SOURCES = {"cmft": ("g_ab", "g_ba"), "self": ("g_aa", "g_bb"), "random": None}
# The CMFT run's settings that must equal this run's for its generators to fit the branches.
MATCHING_KEYS = (("data", "pairing"), ("model", "base"), ("model", "depth"))


def check_init_mode(config: ml_collections.ConfigDict) -> None:
    if config.init.mode not in INIT_SOURCES:
        raise CMFLError("config.init.mode", f"unknown value {config.init.mode!r}; "
                                            f"choose one of {', '.join(INIT_SOURCES)}")


def _check_cmft_config(cmft_workdir: str, config: ml_collections.ConfigDict) -> None:
    """Fail early when the CMFT run used another pairing, width or depth (its ``config.json``, if any)."""
    path = os.path.join(cmft_workdir, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f)
    for section, key in MATCHING_KEYS:
        theirs, ours = saved.get(section, {}).get(key), config[section][key]
        if theirs is not None and theirs != ours:
            raise CMFLError(path, f"the CMFT run has {section}.{key}={theirs!r} but this run has {ours!r}; "
                                  f"set --config.{section}.{key}={theirs!r} or train CMFT with this setting")
    theirs, ours = saved.get("data", {}).get("split"), config.data.split.to_dict()
    if theirs != ours:  # runs from before data.split trained CMFT on every subject
        logging.warning("init: the CMFT run %s has data.split=%s but this run has %s: CMFT may have trained on "
                        "this run's validation subjects", path, theirs, ours)


def cmft_checkpoint(config: ml_collections.ConfigDict) -> tuple[str, int]:
    """(CMFT workdir, checkpoint step) that ``config.init`` points at; fails with a clear message first."""
    workdir = config.init.cmft_workdir
    if not workdir:
        raise CMFLError("config.init.cmft_workdir", f"is empty but config.init.mode={config.init.mode!r} needs a "
                                                    "CMFT run: train one (configs/cmft.py) and pass its workdir, "
                                                    "or set --config.init.mode=random")
    if not os.path.isdir(workdir):
        raise CMFLError(workdir, "CMFT workdir (config.init.cmft_workdir) does not exist")
    step = checkpoints.latest_step(workdir) if config.init.cmft_step < 0 else int(config.init.cmft_step)
    if step is None:
        raise CMFLError(os.path.join(workdir, "checkpoints"), "no CMFT checkpoint here; train CMFT into this "
                                                              "workdir first (configs/cmft.py)")
    _check_cmft_config(workdir, config)
    return workdir, step


def load_generators(config: ml_collections.ConfigDict) -> tuple[dict, dict, str]:
    """Params of the two generators that initialise (S_A, S_B), and the checkpoint folder they came from."""
    names = INIT_SOURCES[config.init.mode]
    workdir, step = cmft_checkpoint(config)
    where = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
    available = {n for n in os.listdir(where) if os.path.isdir(os.path.join(where, n))}
    missing = [n for n in names if n not in available]
    if missing:
        other = "self" if config.init.mode == "cmft" else "cmft"
        raise CMFLError(where, f"has no generator {missing[0]} (items: {', '.join(sorted(available))}); "
                               f"was it trained with another objective? try --config.init.mode={other}")
    abstract = builder.abstract_params(builder.generator(config.model))
    restored = checkpoints.restore_params(workdir, "checkpoints", step, {n: abstract for n in names})
    return restored[names[0]], restored[names[1]], where


def initial_params(rng: jax.Array, model, config: ml_collections.ConfigDict) -> dict:
    """Random params of the CMFF network, with S_A and S_B grafted from the generators unless "random"."""
    check_init_mode(config)
    params = dict(builder.random_params(model, rng))
    if INIT_SOURCES[config.init.mode] is None:
        return params
    source_a, source_b, where = load_generators(config)
    for branch, source, name in (("S_A", source_a, INIT_SOURCES[config.init.mode][0]),
                                 ("S_B", source_b, INIT_SOURCES[config.init.mode][1])):
        if branch in params:
            params[branch], copied = graft_params(source, params[branch], skip=("head",), where=f"{where}/{name}")
            logging.info("init: %s <- %s (%d arrays: every layer but head)", branch, name, len(copied))
    return params


def graft_params(source: Mapping, target: Mapping, skip: tuple[str, ...] = ("head",),
                 where: str | None = None) -> tuple[dict, list[str]]:
    """``target`` with every leaf replaced by ``source``'s, except leaves under a top-level key in ``skip``.

    Returns the new tree and the '/'-joined paths that were copied.

    Raises:
      CMFLError: a leaf of ``target`` is missing in ``source`` or has another shape (``where`` names the
        checkpoint in the message).
    """
    flat_source = traverse_util.flatten_dict(dict(source), sep="/")
    flat_target = traverse_util.flatten_dict(dict(target), sep="/")
    merged, copied = {}, []
    wanted = [p for p in flat_target if p.split("/")[0] not in skip]
    missing = [p for p in wanted if p not in flat_source]
    if missing:  # before shapes: a missing level says "another depth" more plainly than a shape does
        raise CMFLError(where, f"checkpoint has no parameter {missing[0]} ({len(missing)} missing; a network of "
                               "another depth or architecture?)")
    for path, leaf in flat_target.items():
        if path.split("/")[0] in skip:
            merged[path] = leaf
            continue
        src = flat_source[path]
        if tuple(np.shape(src)) != tuple(np.shape(leaf)):
            raise CMFLError(where, f"parameter {path} has shape {tuple(np.shape(src))} in the checkpoint but "
                                   f"{tuple(np.shape(leaf))} in the model (another depth or width?)")
        merged[path] = src
        copied.append(path)
    logging.info("grafted %d of %d parameter arrays from %s", len(copied), len(flat_target), where or "source")
    return traverse_util.unflatten_dict(merged, sep="/"), copied
