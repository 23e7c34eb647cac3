"""``python -m cmfl_jax.synthetic --out DIR --n N``: write a synthetic BraTS data set from the shell.

Errors are one line on stderr with exit status 2, as in the rest of the command line; progress goes to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cmfl_jax.data.layouts import WRITABLE_LAYOUTS
from cmfl_jax.errors import CMFLError
from cmfl_jax.synthetic.anatomy import BRATS_SHAPE
from cmfl_jax.synthetic.subject import LGG_FRACTION, grade_of_seed, subject_seed
from cmfl_jax.synthetic.writer import write_dataset

PROG = "cmfl_jax.synthetic"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit status 2 (as the rest of the CLI)
        self.exit(2, f"{PROG}: error: {message}\n")


def _triple(kind: type):
    def parse(text: str):
        try:
            values = tuple(kind(t) for t in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}") from None
        if len(values) != 3:
            raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers, got {text!r}")
        return values

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cmfl_jax.synthetic --out DIR --n N``: write a synthetic BraTS-layout data set."""
    parser = _Parser(prog=f"python -m {PROG}", description=main.__doc__)
    parser.add_argument("--out", required=True, help="folder to write (created; existing subjects are kept)")
    parser.add_argument("--n", type=int, required=True, help="number of subjects")
    parser.add_argument("--layout", default="brats2018", choices=WRITABLE_LAYOUTS, help="file naming")
    parser.add_argument("--shape", type=_triple(int), default=BRATS_SHAPE, help="voxels, e.g. 240,240,155")
    parser.add_argument("--spacing", type=_triple(float), default=(1.0, 1.0, 1.0), help="mm, e.g. 1,1,1")
    parser.add_argument("--seed", type=int, default=0, help="data set seed (subject i uses seed*100003+i)")
    parser.add_argument("--lgg_fraction", type=float, default=LGG_FRACTION,
                        help="share of LGG-like subjects (no enhancing tumour) over seeds")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)

    from absl import flags, logging

    # Progress lines go to stdout (one per ~10 % when not on a terminal); stderr carries only errors.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS(sys.argv[:1])  # absl's defaults; our own options are argparse's
    logging.use_absl_handler()
    logging.get_absl_handler().python_handler.stream = sys.stdout
    logging.set_verbosity(logging.INFO)
    try:
        subjects = write_dataset(
            args.out, args.n, layout=args.layout, shape=args.shape, seed=args.seed,
            progress=not args.quiet, spacing=args.spacing, lgg_fraction=args.lgg_fraction,
        )
    except CMFLError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{PROG}: error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    if not args.quiet:
        lgg = sum(grade_of_seed(subject_seed(args.seed, i), args.lgg_fraction) == "LGG" for i in range(len(subjects)))
        print(f"{len(subjects)} subjects in {args.out} ({args.layout}; {len(subjects) - lgg} HGG, {lgg} LGG-like)")
    return 0
