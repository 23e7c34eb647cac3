"""Phase 1, CMFT (section 3.1): a CycleGAN between the modality pairs A and B.

Four networks, four optax states: ``g_ab`` (A -> B), ``g_ba`` (B -> A), ``d_a``, ``d_b``.
With ``config.cmft.objective = "self"`` the generators are self-reconstruction networks
``g_aa`` (A -> A) and ``g_bb`` (B -> B) trained with the same machinery (the paper's
Ours_self initialisation): adversarial terms on their outputs plus lambda times the L1
reconstruction. No history buffer of fakes is used: the discriminators see the current
generators' fakes (batch 1, as in the paper).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmfl_jax import losses, sharding
from cmfl_jax.data.dataset import load_entries
from cmfl_jax.data.pairs import pair_channels, split_pairs
from cmfl_jax.data.pipeline import patch_dataset
from cmfl_jax.errors import CMFLError
from cmfl_jax.models import PatchDiscriminator, UNet3D
from cmfl_jax.previews import save_translation_png
from cmfl_jax.training import DTYPES, Phase, create_train_state, fit, make_optimizer, skip_nonfinite

GENERATORS = {"cycle": ("g_ab", "g_ba"), "self": ("g_aa", "g_bb")}


def build_models(config: ml_collections.ConfigDict) -> tuple[UNet3D, PatchDiscriminator]:
    m = config.model
    dtype = DTYPES[m.dtype]
    generator = UNet3D(out_channels=2, base=m.base, depth=m.depth, dtype=dtype, conv_impl=m.conv_impl)
    discriminator = PatchDiscriminator(dtype=dtype, conv_impl=m.conv_impl)
    return generator, discriminator


def create_states(rng: jax.Array, config: ml_collections.ConfigDict) -> dict:
    """The four train states, each with its own Adam (generators and discriminators may differ in lr)."""
    generator, discriminator = build_models(config)
    c, steps = config.cmft, config.train.steps
    g_tx = lambda: make_optimizer(c.g_lr, c.b1, c.b2, steps, c.decay_start)
    d_tx = lambda: make_optimizer(c.d_lr, c.b1, c.b2, steps, c.decay_start)
    g_size = 2**config.model.depth
    g1, g2 = GENERATORS[c.objective]
    keys = jax.random.split(rng, 4)
    return {
        g1: create_train_state(keys[0], generator, (1, g_size, g_size, g_size, 2), g_tx()),
        g2: create_train_state(keys[1], generator, (1, g_size, g_size, g_size, 2), g_tx()),
        "d_a": create_train_state(keys[2], discriminator, (1, 32, 32, 32, 2), d_tx()),
        "d_b": create_train_state(keys[3], discriminator, (1, 32, 32, 32, 2), d_tx()),
    }


def _gen(state, params, x):
    return state.apply_fn({"params": params}, x)[0]


def _disc(state, params, x):
    return state.apply_fn({"params": params}, x)


def _outputs(g1, p1, g2, p2, a, b, objective: str) -> dict:
    """The generators' outputs with the given params: the one definition of the CMFT forward pass.

    "cycle": fake B = G_AB(A), fake A = G_BA(B) and their reconstructions; "self": the
    self-reconstructions G_AA(A) and G_BB(B) (stored as ``fake_a``, ``fake_b``).
    """
    if objective == "self":
        return {"fake_a": _gen(g1, p1, a), "fake_b": _gen(g2, p2, b)}
    fake_b, fake_a = _gen(g1, p1, a), _gen(g2, p2, b)
    return {"fake_b": fake_b, "rec_a": _gen(g2, p2, fake_b), "fake_a": fake_a, "rec_b": _gen(g1, p1, fake_a)}


def translate(states: dict, a: jax.Array, b: jax.Array, objective: str) -> dict:
    """The generators' outputs for previews: fake B, reconstructed A, fake A, reconstructed B (or out A/B)."""
    g1, g2 = (states[n] for n in GENERATORS[objective])
    out = _outputs(g1, g1.params, g2, g2.params, a, b, objective)
    if objective == "self":
        return {"out_a": out["fake_a"], "out_b": out["fake_b"]}
    return out


def train_step(states: dict, batch: dict, rng: jax.Array, *, pairing: str, objective: str,
               lambda_cycle: float, identity_weight: float) -> tuple[dict, dict]:
    """One CMFT step: generators on Eq. 6 (plus optional identity), then discriminators on stop-gradient fakes."""
    del rng  # the step is deterministic; the argument keeps the signature of every phase
    a, b = split_pairs(batch["image"], pairing)
    n1, n2 = GENERATORS[objective]
    g1, g2, d_a, d_b = states[n1], states[n2], states["d_a"], states["d_b"]

    def generator_loss(g_params):
        p1, p2 = g_params
        out = _outputs(g1, p1, g2, p2, a, b, objective)
        fake_a, fake_b = out["fake_a"], out["fake_b"]
        if objective == "cycle":
            recon = losses.l1_loss(out["rec_a"], a) + losses.l1_loss(out["rec_b"], b)  # Eq. 4
        else:
            recon = losses.l1_loss(fake_a, a) + losses.l1_loss(fake_b, b)
        adv = losses.lsgan_generator_loss(_disc(d_b, d_b.params, fake_b)) + losses.lsgan_generator_loss(
            _disc(d_a, d_a.params, fake_a)
        )
        total = adv + lambda_cycle * recon  # Eq. 6
        metrics = {"g_adv": adv, "cycle" if objective == "cycle" else "recon": recon}
        if identity_weight > 0 and objective == "cycle":
            identity = losses.l1_loss(_gen(g1, p1, b), b) + losses.l1_loss(_gen(g2, p2, a), a)
            total = total + identity_weight * identity
            metrics["identity"] = identity
        metrics["g_total"] = total
        return total, (metrics, fake_a, fake_b)

    (_, (metrics, fake_a, fake_b)), (grad1, grad2) = jax.value_and_grad(generator_loss, has_aux=True)(
        (g1.params, g2.params)
    )
    fake_a, fake_b = jax.lax.stop_gradient(fake_a), jax.lax.stop_gradient(fake_b)

    def discriminator_loss(params, state, real, fake):
        return losses.lsgan_discriminator_loss(_disc(state, params, real), _disc(state, params, fake))  # Eq. 2/3

    loss_da, grad_da = jax.value_and_grad(discriminator_loss)(d_a.params, d_a, a, fake_a)
    loss_db, grad_db = jax.value_and_grad(discriminator_loss)(d_b.params, d_b, b, fake_b)
    new_states = {
        n1: g1.apply_gradients(grads=grad1),
        n2: g2.apply_gradients(grads=grad2),
        "d_a": d_a.apply_gradients(grads=grad_da),
        "d_b": d_b.apply_gradients(grads=grad_db),
    }
    metrics = {**metrics, "d_a": loss_da, "d_b": loss_db}
    return skip_nonfinite({k: states[k] for k in new_states}, new_states, metrics, (grad1, grad2, grad_da, grad_db))


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """The jitted step for this config (states donated: updated in place), data parallel over ``mesh``
    (default: all devices; :func:`cmfl_jax.sharding.jit_train_step`)."""
    c = config.cmft
    step = functools.partial(train_step, pairing=config.data.pairing, objective=c.objective,
                             lambda_cycle=c.lambda_cycle, identity_weight=c.identity_weight)
    return sharding.jit_train_step(step, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train CMFT on the configured data; returns the final states."""
    sharding.initialize_distributed(config)
    c = config.cmft
    if c.objective not in GENERATORS:
        raise CMFLError("config.cmft.objective", f"unknown objective {c.objective!r}; choose cycle or self")
    pair_channels(config.data.pairing)  # fail early on a bad pairing
    entries = load_entries(config.data)
    d = config.data
    dataset = patch_dataset(entries, d.patch_size, seed=config.seed,
                            batch_size=sharding.host_batch_size(config.train.batch_size), tumour_prob=d.tumour_prob,
                            flip=d.flip, num_workers=d.num_workers, shard=sharding.data_shard(config))
    states = create_states(jax.random.key(config.seed), config)
    preview = jax.jit(functools.partial(translate, objective=c.objective))

    def on_step(step, states, batch):
        if config.train.preview_every and step % config.train.preview_every == 0:
            a, b = split_pairs(batch["image"], config.data.pairing)
            outputs = jax.device_get(preview(states, a[:1], b[:1]))
            path = os.path.join(workdir, "previews", f"cmft_{step:07d}.png")
            save_translation_png(path, np.asarray(a[0]), np.asarray(b[0]), {k: v[0] for k, v in outputs.items()},
                                 title=f"CMFT step {step}")
        return None

    phase = Phase("cmft", states, make_train_step(config), to_batch=lambda b: {"image": jnp.asarray(b["image"])},
                  on_step=on_step)
    states, _ = fit(phase, dataset, config.train, workdir, config.seed)
    return states


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
    train_and_evaluate(config, workdir)
