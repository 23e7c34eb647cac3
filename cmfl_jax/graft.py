"""Carry trained weights into a network of the same architecture but a different last layer.

CMFF starts its branches S_A and S_B from the CMFT generators: every layer but the last is
copied (section 4.1). :func:`graft_params` does that on plain parameter trees and fails with a
clear message when the trees do not match (a checkpoint of another depth or width).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from absl import logging
from flax import traverse_util

from cmfl_jax.errors import CMFLError


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
