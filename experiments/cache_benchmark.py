"""Size and read speed of the pre-processed cache in several storage formats, on BraTS-sized phantoms.

Writes ``--n`` synthetic 240x240x155 subjects into ``--data`` once (reused later), builds every subject's cache in
each format of ``FORMATS`` (the cache's own through ``cmfl_jax.data.cache.cache_subject``, the others here) and
measures MB per subject, the build time, and the time to read ``--patches`` random ``--patch``^3 patches as the
training sampler reads them (half centred in the tumour), "warm" (page cache; wall and CPU time) and "cold" (the
entry's files dropped from the page cache first). Every format reads each patch in turn, in a random order, so the
machine's other load falls on all alike; each figure is the best of ``--repeats`` passes. Also the largest
difference of a patch from the first format's. The JSON and its table (``.md``) go to ``--out``; docs/data.md
tells what they mean.

    .venv/bin/python -m experiments.cache_benchmark --data /tmp/cache_bench/data [--n 12] [--patches 100]
        [--work /tmp/cache_bench/work] [--out experiments/results/cache_benchmark.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

from cmfl_jax.data import cache
from cmfl_jax.data import cached_subject as cs
from cmfl_jax.data.io import load_subject
from cmfl_jax.data.pipeline import crop_centered
from cmfl_jax.data.preprocess import preprocess_images
from experiments import harness

SHAPE = (240, 240, 155)
DEFAULT_OUT = os.path.join("experiments", "results", "cache_benchmark.json")
# name -> (storage, image dtype, cropped, blosc2 byte shuffle, read as stored)
FORMATS = {
    "float32 npy, uncropped (format 1)": ("npy", np.float32, False, None, False),
    "float32 npy, cropped": ("npy", np.float32, True, None, False),
    "float16 npy, cropped": ("float16", np.float16, True, None, True),
    "float16 npy, cropped, cast on read": ("float16", np.float16, True, None, False),
    "float32 blosc2, cropped": ("blosc2", np.float32, True, True, False),
    "float32 blosc2 no shuffle, cropped": ("blosc2", np.float32, True, False, False),
    "float16 blosc2, cropped": ("blosc2", np.float16, True, True, True),
}


class Entry:
    """What the benchmark needs of an entry in any format: its folder, storage, crop offset, the image's read dtype."""

    def __init__(self, path: str, storage: str, offset, as_stored: bool):
        self.path, self.storage, self.offset = path, storage, np.asarray(offset)
        self.dtype = None if as_stored else np.float32

    def _path(self, name: str) -> str:
        return os.path.join(self.path, name + cs.FILES[self.storage][name][0])

    def image(self):
        return cs.open_array(self._path("image"), self.dtype)

    def label(self):
        return cs.open_array(self._path("label"), np.uint8)

    def files(self) -> list[str]:
        return [os.path.join(self.path, f) for f in os.listdir(self.path)]


def is_native(storage: str, dtype, cropped: bool, shuffle: bool | None) -> bool:
    """Whether ``cmfl_jax.data.cache`` writes this format itself."""
    return cropped and (storage == "float16" or (dtype == np.float32 and (storage == "npy" or
                                                                          shuffle == cs.BLOSC2_SHUFFLE)))


def build_other(subject, folder: str, storage: str, dtype, cropped: bool, shuffle: bool | None,
                as_stored: bool) -> Entry:
    """An entry in a format the cache does not write (format 1, a float16 blosc2 image...), laid out as the cache's."""
    loaded = load_subject(subject)
    image = np.moveaxis(preprocess_images(loaded.images), 0, -1)
    keep = np.any(loaded.images != 0, axis=0) | (loaded.label > 0)
    box = cache.crop_box(keep) if cropped else [[0, n] for n in keep.shape]
    window = tuple(slice(lo, hi) for lo, hi in box)
    os.makedirs(folder)
    image = np.ascontiguousarray(image[window]).astype(dtype, copy=False)
    cs.write_array(os.path.join(folder, "image" + cs.FILES[storage]["image"][0]), image, cs.BLOSC2_CHUNKS["image"],
                   shuffle)
    label = np.ascontiguousarray(loaded.label[window])
    cs.write_array(os.path.join(folder, "label" + cs.FILES[storage]["label"][0]), label, cs.BLOSC2_CHUNKS["label"],
                   shuffle)
    np.save(os.path.join(folder, "tumour_index.npy"),
            np.flatnonzero(label > 0).astype(np.int32 if cropped else np.int64))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"crop_offset": [lo for lo, _ in box], "shape": [hi - lo for lo, hi in box]}, f)
    return Entry(folder, storage, [lo for lo, _ in box], as_stored)


def drop_from_page_cache(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_patch(entry: Entry, centre: np.ndarray, size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    c = centre - entry.offset
    return crop_centered(entry.image(), c, size), crop_centered(entry.label(), c, size)


def centres(subjects, n: int, seed: int) -> list[tuple[int, np.ndarray]]:
    """(subject index, full-grid centre): even draws a tumour voxel, odd ones any brain voxel (of a random subject)."""
    masks = []
    for subject in subjects:
        loaded = load_subject(subject)
        masks.append((np.flatnonzero(loaded.label > 0), np.flatnonzero(np.any(loaded.images != 0, axis=0))))
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s = int(rng.integers(len(subjects)))
        voxels = masks[s][i % 2]
        out.append((s, np.array(np.unravel_index(int(voxels[rng.integers(len(voxels))]), SHAPE))))
    return out


def markdown(rows: list[dict]) -> str:
    keys = ["format", "MB/subject", "patch read ms (warm)", "CPU ms (warm)", "patch read ms (cold)",
            "build s/subject", "max abs diff"]
    lines = ["| " + " | ".join(keys) + " |", "|---|" + "---:|" * (len(keys) - 1)]
    for r in rows:
        name = r["format"] + (" **(the cache)**" if r["default"] else "")
        lines.append(f"| {name} | {r['mb_per_subject']:.1f} | {r['read_ms_warm']:.1f} | {r['read_cpu_ms_warm']:.1f} | "
                     f"{r['read_ms_cold']:.1f} | {r['build_s_per_subject']:.2f} | {r['max_abs_diff']:.2g} |")
    return "\n".join(lines)


def measure(args: argparse.Namespace, subjects, work: str) -> dict[str, dict]:
    size = (args.patch,) * 3
    entries: dict[str, list[Entry]] = {}
    rows: dict[str, dict] = {}
    for name in args.formats:
        storage, dtype, cropped, shuffle, as_stored = FORMATS[name]
        folder = os.path.join(work, name.split(" (")[0].replace(", ", "-").replace(" ", "-"))
        shutil.rmtree(folder, ignore_errors=True)
        native = is_native(storage, dtype, cropped, shuffle)
        t0 = time.perf_counter()
        if native:
            built = [cache.cache_subject(s, folder, storage=storage) for s in subjects]
            entries[name] = [Entry(e.path, storage, e.meta["crop_offset"], as_stored) for e in built]
        else:
            entries[name] = [build_other(s, os.path.join(folder, s.subject_id), storage, dtype, cropped, shuffle,
                                         as_stored) for s in subjects]
        build_s = (time.perf_counter() - t0) / len(subjects)
        nbytes = [sum(os.path.getsize(f) for f in e.files()) for e in entries[name]]
        rows[name] = {"format": name, "storage": storage, "dtype": np.dtype(dtype).name, "cropped": cropped,
                      "shuffle": shuffle, "default": native and storage == cache.DEFAULT_STORAGE and as_stored,
                      "mb_per_subject": statistics.mean(nbytes) / 1e6, "mb_max": max(nbytes) / 1e6,
                      "build_s_per_subject": build_s, "warm": [], "warm_cpu": [], "cold": []}
        print(f"built {name}: {rows[name]['mb_per_subject']:.1f} MB/subject, {build_s:.2f} s/subject", flush=True)

    points = centres(subjects, args.patches, args.seed)
    reference = [read_patch(entries[args.formats[0]][s], c, size) for s, c in points]
    for name in args.formats:
        patches = [read_patch(entries[name][s], c, size) for s, c in points]
        rows[name]["max_abs_diff"] = max(float(np.max(np.abs(p[0].astype(np.float32) - r[0])))
                                         for p, r in zip(patches, reference, strict=True))
        rows[name]["labels_equal"] = all(np.array_equal(p[1], r[1]) for p, r in zip(patches, reference, strict=True))
        del patches
    rng = np.random.default_rng(args.seed + 1)
    for _ in range(args.repeats):
        for mode in ("warm", "cold"):
            wall = dict.fromkeys(args.formats, 0.0)
            cpu = dict.fromkeys(args.formats, 0.0)
            for s, c in points:  # every format reads this patch, in a random order: an equal share of the noise
                for name in rng.permutation(args.formats):
                    entry = entries[name][s]
                    if mode == "cold":
                        drop_from_page_cache(entry.files())
                    t0, c0 = time.perf_counter(), time.process_time()
                    read_patch(entry, c, size)
                    wall[name] += time.perf_counter() - t0
                    cpu[name] += time.process_time() - c0
            for name in args.formats:
                rows[name][mode].append(1000 * wall[name] / len(points))
                if mode == "warm":
                    rows[name]["warm_cpu"].append(1000 * cpu[name] / len(points))
    for r in rows.values():
        r["read_ms_warm"], r["read_cpu_ms_warm"], r["read_ms_cold"] = (min(r["warm"]), min(r["warm_cpu"]),
                                                                       min(r["cold"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder of the phantoms (written once, then reused)")
    parser.add_argument("--work", default=None, help="folder for the caches (default: a temporary one, removed)")
    parser.add_argument("--n", type=int, default=12, help="subjects")
    parser.add_argument("--patches", type=int, default=100, help="patches read per format and pass")
    parser.add_argument("--patch", type=int, default=128, help="patch edge in voxels")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the patches; the best counts")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS),
                        help="the first is the reference of the differences")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON of the results (the table goes next to it, .md)")
    args = parser.parse_args(argv)

    from cmfl_jax.data.layouts import discover
    from cmfl_jax.synthetic import write_dataset

    write_dataset(args.data, args.n, layout="brats2021", shape=SHAPE, seed=0)
    subjects = discover(args.data)[: args.n]
    work = args.work or tempfile.mkdtemp(prefix="cache_bench_")
    try:
        rows = measure(args, subjects, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    machine, table = harness.machine_info(), markdown(list(rows.values()))
    command = harness.command("experiments.cache_benchmark", argv)
    settings = {"n": len(subjects), "shape": SHAPE, "patches": args.patches, "patch": args.patch,
                "repeats": args.repeats, "crop_margin": cache.CROP_MARGIN, "blosc2_chunks": cs.BLOSC2_CHUNKS}
    result = {"date": harness.now(), "machine": machine, "settings": settings, "command": command,
              "rows": list(rows.values())}
    load = " ".join(machine["load_average"] or [])
    harness.write_outputs(args.out, result, f"{len(subjects)} phantoms at {'x'.join(map(str, SHAPE))}, "
                          f"{args.patches} patches of {args.patch}^3, best of {args.repeats} passes, "
                          f"{machine['cpu_count']} CPUs (load average {load} at the end); `{command}`\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
