"""Orbax checkpoints: one item per network (params + optimizer state) plus a JSON ``meta`` item.

``meta`` holds the step and the grain iterator state, so a resumed run continues with the same
data order (the steps draw no random numbers). Saves are asynchronous; call
:func:`close` (it waits) before the process exits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization, traverse_util

from cmfl_jax.errors import CMFLError


def make_manager(workdir: str, max_to_keep: int | None = 3, subdir: str = "checkpoints",
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A manager for ``<workdir>/<subdir>``; half-written (temporary) checkpoints are cleaned up on open.

    The caller decides when to save (Orbax's own interval logic would also save the first step).
    ``read_only`` opens another run's checkpoints (CMFF reading CMFT's) without touching them.

    With several processes every one must open the manager and call each save (Orbax writes from process 0
    and synchronises them). Its barriers are named after the step (``async_write_complete.3``), so managers
    saving the same step at once (CMFF's ``checkpoints``, ``best`` and ``final`` at the last step) would
    collide and hang: each subdir gets its own barrier prefix.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,  # never deletes, never saves (no warnings as read_only=True)
        cleanup_tmp_directories=not read_only,
        create=not read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=subdir),
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, subdir)), options=options)


@contextlib.contextmanager
def read_only(workdir: str, subdir: str = "checkpoints") -> Iterator[ocp.CheckpointManager]:
    """Another run's (or a finished run's) checkpoints, opened without touching them and always closed."""
    manager = make_manager(workdir, None, subdir, read_only=True)
    try:
        yield manager
    finally:
        manager.close()


def latest_step(workdir: str, subdir: str = "checkpoints") -> int | None:
    """The newest finished checkpoint step under ``<workdir>/<subdir>``, or None (no folder, no checkpoint)."""
    if not os.path.isdir(os.path.join(workdir, subdir)):
        return None
    with read_only(workdir, subdir) as manager:
        return manager.latest_step()


def latest_meta(workdir: str, subdir: str) -> dict | None:
    """The JSON ``meta`` of the newest checkpoint under ``<workdir>/<subdir>``, or None when there is none."""
    if latest_step(workdir, subdir) is None:
        return None
    with read_only(workdir, subdir) as manager:
        return read_meta(manager)


def restore_params(workdir: str, subdir: str, step: int, abstract: Mapping[str, Any]) -> dict[str, dict]:
    """Only the ``params`` of the named items (no optimizer state), restored onto ``{item: abstract params}``.

    Leaves the checkpoint lacks are dropped from the result, so the caller reports them in its own terms
    (another depth for a CMFT run, another architecture for a CMFF run).
    """
    with read_only(workdir, subdir) as manager:
        restored, _ = restore(manager, {n: {"params": tree} for n, tree in abstract.items()}, step=step,
                              partial=True)
    return {name: _restored_only(restored[name]["params"]) for name in abstract}


def _restored_only(tree: dict) -> dict:
    flat = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if not isinstance(v, jax.ShapeDtypeStruct)})


def read_meta(manager: ocp.CheckpointManager, step: int | None = None) -> dict | None:
    """The JSON ``meta`` item of a checkpoint (default: the latest), or None when there is none."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


def save(manager: ocp.CheckpointManager, step: int, states: Mapping[str, Any], meta: dict,
         force: bool = False) -> bool:
    """Save every state (one Orbax item each) and the JSON ``meta``; returns whether it saved."""
    items = {name: ocp.args.StandardSave(state) for name, state in states.items()}
    items["meta"] = ocp.args.JsonSave(meta)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, targets: Mapping[str, Any], step: int | None = None,
            partial: bool = False) -> tuple[dict, dict]:
    """Restore the items named in ``targets`` onto their (abstract or concrete) trees; returns (states, meta).

    ``partial=True`` restores only the sub-trees a target names, e.g. ``{"g_ab": {"params": ...}}``
    takes a generator's params and leaves its optimizer state on disk (CMFF initialisation).
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CMFLError(manager.directory, "no checkpoint found")
    items = {}
    for name, target in targets.items():
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        if partial:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
            items[name] = ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)
        else:
            _check_layout(os.path.join(manager.directory, str(step), name), abstract)
            items[name] = ocp.args.StandardRestore(abstract)
    items["meta"] = ocp.args.JsonRestore()
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CMFLError(os.path.join(manager.directory, str(step)), f"cannot restore checkpoint: {first_line}") from e
    return {n: restored[n] for n in targets}, dict(restored["meta"])


def _flat_shapes(tree) -> dict[str, tuple[int, ...]]:
    def key_name(k) -> str:
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
    return {"/".join(key_name(k) for k in path): tuple(getattr(leaf, "shape", np.shape(leaf)))
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_layout(item_dir: str, abstract) -> None:
    """Compare the saved arrays' names and shapes with ``abstract`` before restoring: one clear error for a
    checkpoint of another architecture (Orbax would fail inside its parallel reads, with noise on stderr)."""
    try:
        saved = ocp.StandardCheckpointer().metadata(item_dir).item_metadata
    except (FileNotFoundError, ValueError):
        return  # not a standard item: the restore itself reports it
    saved, wanted = _flat_shapes(saved), _flat_shapes(serialization.to_state_dict(abstract))
    missing = sorted(set(wanted) - set(saved))
    if missing:
        raise CMFLError(item_dir, f"checkpoint has no {missing[0]} ({len(missing)} arrays missing): it was saved by "
                                  f"another architecture or variant")
    for key, shape in sorted(wanted.items(), key=lambda kv: not kv[0].startswith("params")):  # params first
        if saved[key] != shape:
            raise CMFLError(item_dir, f"{key} has shape {saved[key]} in the checkpoint but {shape} in this run: it "
                                      f"was saved by another architecture (model.base / model.depth?)")


def close(manager: ocp.CheckpointManager) -> None:
    """Finish pending asynchronous saves, then release the manager."""
    manager.wait_until_finished()
    manager.close()
