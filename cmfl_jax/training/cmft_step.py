"""CMFT's four train states and its jitted step (section 3.1): Eq. 6 for the generators, Eq. 2-3 for D.

Four networks, four optax states. The generators are named by what they map: ``g_ab`` (A -> B) and
``g_ba`` (B -> A) for ``objective="cycle"``; ``g_aa`` and ``g_bb`` (self-reconstruction, the paper's
Ours_self) for ``"self"``. Either way the first takes pair A and the second pair B. No history buffer of
fakes: the discriminators see the current generators' fakes (batch 1, as in the paper).
"""

from __future__ import annotations

import functools

import jax
import ml_collections

from cmfl_jax import losses, sharding
from cmfl_jax.data.pairs import split_pairs
from cmfl_jax.models import builder
from cmfl_jax.training import loss_scale
from cmfl_jax.training.state import create_train_state, make_optimizer, skip_nonfinite

# objective -> (the generator that takes pair A, the one that takes pair B); their checkpoint item names.
GENERATORS = {"cycle": ("g_ab", "g_ba"), "self": ("g_aa", "g_bb")}
GENERATOR_LOSSES = {"cycle": losses.cmft_generator_loss, "self": losses.self_reconstruction_generator_loss}




def create_states(rng: jax.Array, config: ml_collections.ConfigDict) -> dict:
    """The four train states, each with its own Adam (generators and discriminators may differ in lr), and with
    float16 the two loss scales (:mod:`cmfl_jax.training.loss_scale`)."""
    c, steps = config.cmft, config.train.steps
    from_a, from_b = GENERATORS[c.objective]
    generator, discriminator = builder.generator(config.model), builder.discriminator(config.model)
    g_tx = lambda: make_optimizer(c.g_lr, c.b1, c.b2, steps, c.decay_start)
    d_tx = lambda: make_optimizer(c.d_lr, c.b1, c.b2, steps, c.decay_start)
    keys = jax.random.split(rng, 4)
    return {
        from_a: create_train_state(keys[0], generator, g_tx()),
        from_b: create_train_state(keys[1], generator, g_tx()),
        "d_a": create_train_state(keys[2], discriminator, d_tx()),
        "d_b": create_train_state(keys[3], discriminator, d_tx()),
        **loss_scale.create(config, ("generators", "discriminators")),  # float16 only
    }


def _network(state, params):
    """The network of ``state`` with ``params`` as a plain ``x -> y`` function (a generator returns (y, features))."""

    def apply(x):
        y = state.apply_fn({"params": params}, x)
        return y[0] if isinstance(y, tuple) else y

    return apply


def translate(states: dict, a: jax.Array, b: jax.Array, objective: str) -> dict:
    """The generators' outputs for previews: fake B, reconstructed A, fake A, reconstructed B (or out A/B)."""
    from_a, from_b = (states[n] for n in GENERATORS[objective])
    g_a, g_b = _network(from_a, from_a.params), _network(from_b, from_b.params)
    if objective == "self":
        return {"out_a": g_a(a), "out_b": g_b(b)}
    fake_b, fake_a = g_a(a), g_b(b)
    return {"fake_b": fake_b, "rec_a": g_b(fake_b), "fake_a": fake_a, "rec_b": g_a(fake_a)}


def train_step(states: dict, batch: dict, *, pairing: str, objective: str, lambda_cycle: float,
               identity_weight: float, scaled: bool = False) -> tuple[dict, dict]:
    """One CMFT step: generators on Eq. 6 (plus optional identity), then discriminators on Eq. 2-3; ``scaled``:
    float16 with the loss scales of ``states["loss_scale"]`` (``generators``, ``discriminators``)."""
    a, b = split_pairs(batch["image"], pairing)
    name_a, name_b = GENERATORS[objective]
    g_a, g_b, d_a, d_b = states[name_a], states[name_b], states["d_a"], states["d_b"]
    judge_a, judge_b = _network(d_a, d_a.params), _network(d_b, d_b.params)
    extra = {"identity_weight": identity_weight} if objective == "cycle" else {}

    def generator_loss(g_params):
        total, terms, fakes = GENERATOR_LOSSES[objective](_network(g_a, g_params[0]), _network(g_b, g_params[1]),
                                                          judge_a, judge_b, a, b, lambda_cycle, **extra)
        return total, (terms, fakes)

    scales = states[loss_scale.ITEM] if scaled else {"generators": None, "discriminators": None}
    (_, (metrics, (fake_a, fake_b))), (grad_a, grad_b), g_scale, g_room = loss_scale.value_and_grad(
        generator_loss, (g_a.params, g_b.params), scales["generators"])

    def discriminator_loss(d_params):
        return losses.cmft_discriminator_loss(_network(d_a, d_params[0]), _network(d_b, d_params[1]),
                                              a, b, fake_a, fake_b)

    (_, d_terms), (grad_da, grad_db), d_scale, d_room = loss_scale.value_and_grad(
        discriminator_loss, (d_a.params, d_b.params), scales["discriminators"])
    new_states = {
        name_a: g_a.apply_gradients(grads=grad_a),
        name_b: g_b.apply_gradients(grads=grad_b),
        "d_a": d_a.apply_gradients(grads=grad_da),
        "d_b": d_b.apply_gradients(grads=grad_db),
    }
    metrics, grads = {**metrics, **d_terms}, (grad_a, grad_b, grad_da, grad_db)
    if scaled:  # a failure is counted when either group's gradients are non-finite with no room to back off
        room = g_room & d_room
        new_scales = {"generators": g_scale, "discriminators": d_scale}
        metrics = loss_scale.guard_metrics(metrics, grads, room, new_scales)
    new_states, metrics = skip_nonfinite({k: states[k] for k in new_states}, new_states, metrics, grads)
    return ({**new_states, loss_scale.ITEM: new_scales} if scaled else new_states), metrics


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None):
    """The jitted step for this config (states donated: updated in place), data parallel over ``mesh``
    (default: all devices; :func:`cmfl_jax.sharding.jit_train_step`)."""
    c = config.cmft
    step = functools.partial(train_step, pairing=config.data.pairing, objective=c.objective,
                             lambda_cycle=c.lambda_cycle, identity_weight=c.identity_weight,
                             scaled=loss_scale.enabled(config))
    return sharding.jit_train_step(step, mesh)
