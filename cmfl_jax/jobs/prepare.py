"""The ``prepare`` job: validate a data root, build the cache, summarise what is there."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import ml_collections
from absl import logging

from cmfl_jax.data.cached_subject import CachedSubject
from cmfl_jax.data.dataset import load_entries, resolve_root
from cmfl_jax.data.io import atomic_path
from cmfl_jax.label_sets import TISSUES


def _fmt_counter(counter: Counter) -> str:
    return ", ".join(f"{k} ({v})" if len(counter) > 1 else k for k, v in sorted(counter.items()))


def dataset_overview(entries: list[CachedSubject]) -> list[dict]:
    """One row per (layout, label set, grade): subjects, shapes, spacings, mean voxels per internal tissue (those
    of any entry: 0/1/2/4, plus CC and RC for the 2024 sets), subjects with ET."""
    groups: dict[tuple[str, str, str], list[CachedSubject]] = defaultdict(list)
    for e in entries:
        groups[(e.meta["layout"], e.meta["grade"] or "-", e.meta.get("label_set", "brats2021"))].append(e)
    tissues = sorted({int(v) for e in entries if e.has_label for v in e.meta["label_counts"]} - {0})
    groups[("all", "", "")] = list(entries)
    rows = []
    for (layout, grade, label_set), members in groups.items():
        labelled = [e for e in members if e.has_label]
        row = {
            "layout": layout,
            "grade": grade,
            "subjects": len(members),
            "shapes": _fmt_counter(Counter("x".join(map(str, e.meta["full_shape"])) for e in members)),
            "spacings": _fmt_counter(Counter("x".join(f"{s:g}" for s in e.meta["spacing"]) for e in members)),
        }
        for value in tissues:
            counts = [e.meta["label_counts"].get(str(value), 0) for e in labelled]
            row[f"mean voxels {TISSUES[value]}"] = round(sum(counts) / len(counts)) if counts else None
        row["with ET"] = sum(e.meta["label_counts"].get("4", 0) > 0 for e in labelled)
        row["label set"] = label_set
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Rows of dicts with equal keys as a GitHub Markdown table."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join("" if r[k] is None else str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def cache_size(entries: list[CachedSubject]) -> dict:
    """What the entries take on disk: ``{"cache_dir", "subjects", "total_bytes", "bytes_per_subject"}``."""
    sizes = [e.nbytes() for e in entries]
    return {"cache_dir": os.path.dirname(entries[0].path) if entries else "", "subjects": len(sizes),
            "total_bytes": sum(sizes), "bytes_per_subject": round(sum(sizes) / max(len(sizes), 1))}


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    root = resolve_root(config.data)
    logging.info("preparing %s", root)
    entries = load_entries(config.data, announce=print)  # prints the cache's estimated size before building
    rows = dataset_overview(entries)
    table = markdown_table(rows)
    os.makedirs(workdir, exist_ok=True)
    with atomic_path(os.path.join(workdir, "prepare_summary.json")) as tmp, open(tmp, "w") as f:
        json.dump({"root": os.path.abspath(root), "rows": rows, "cache": cache_size(entries)}, f, indent=1)
    with atomic_path(os.path.join(workdir, "prepare_summary.md")) as tmp, open(tmp, "w") as f:
        f.write(f"Data root: `{os.path.abspath(root)}`\n\n{table}\n")
    print(f"\n{len(entries)} subjects in {root} (cache: {os.path.dirname(entries[0].path)})\n\n{table}\n")
    return rows
