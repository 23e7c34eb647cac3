"""The built-in synthetic BraTS data set: realistic brains with a glioma, made on the spot.

BraTS cannot be downloaded on the machines this project runs on, so every job (and every test) can run on
phantoms instead. This package makes them; the data layer reads them back like any BraTS release (dataset
creation is kept apart from data loading, as in nnU-Net). One module per step of a subject, in the order
:func:`make_subject` runs them:

* ``anatomy``: the MNI152 template (from nilearn, no download) placed on the grid, warped, sampled;
* ``tumour``: the glioma's shape, position and mass effect, its labels and soft fractions;
* ``contrast``: intensities per tissue and modality, bias field, Rician noise;
* ``subject``: :func:`make_subject`, a deterministic function of the seed; ``writer``: :func:`write_dataset`,
  N subjects in a BraTS layout; ``cli``: ``python -m cmfl_jax.synthetic --out DIR --n N [--layout brats2018]
  [--shape 240,240,155] [--seed 0]``; ``montage``: the picture in docs/data.md.

Its speed per BraTS-sized subject: docs/timings.md.
"""

from cmfl_jax.synthetic.anatomy import BRATS_SHAPE
from cmfl_jax.synthetic.subject import LGG_FRACTION, Phantom, brats_affine, grade_of_seed, make_subject, subject_seed
from cmfl_jax.synthetic.writer import write_dataset

__all__ = [
    "BRATS_SHAPE",
    "LGG_FRACTION",
    "Phantom",
    "brats_affine",
    "grade_of_seed",
    "make_subject",
    "subject_seed",
    "write_dataset",
]
