"""``python -m tests.selection_spy OUT.json <cmfl_jax.main flags>``: the CLI, with a record of which subjects reach
the code that selects (CMFF's validation: ``best/`` and the ET threshold) and the code that scores out of fold.

The records are the arguments those functions actually receive, written to ``OUT.json`` at exit, keyed by the
workdir of the run they belong to; tests/test_cv.py checks that no scored subject was ever selected on.
"""

from __future__ import annotations

import json
import sys

from cmfl_jax import main
from cmfl_jax.training import cross_validation, validation

RECORD: dict[str, dict[str, list[str]]] = {"selected": {}, "scored": {}}


def _note(kind: str, workdir: str, ids) -> None:
    RECORD[kind].setdefault(str(workdir), []).extend(sorted(ids))


def _spy() -> None:
    init, evaluate, out_of_fold = (validation.Validator.__init__, validation.Validator.evaluate,
                                   cross_validation.out_of_fold)

    def spied_init(self, config, entries, workdir):
        _note("selected", workdir, (e.subject_id for e in entries))
        init(self, config, entries, workdir)

    def spied_evaluate(self, params, entries, step=None):
        _note("selected", self.workdir, (e.subject_id for e in entries))
        return evaluate(self, params, entries, step)

    def spied_out_of_fold(model_dir, subjects, *args, **kwargs):
        _note("scored", model_dir, (s.subject_id for s in subjects))
        return out_of_fold(model_dir, subjects, *args, **kwargs)

    validation.Validator.__init__, validation.Validator.evaluate = spied_init, spied_evaluate
    cross_validation.out_of_fold = spied_out_of_fold


if __name__ == "__main__":
    out = sys.argv.pop(1)
    _spy()
    try:
        main.cli()
    finally:
        with open(out, "w") as f:
            json.dump(RECORD, f)
