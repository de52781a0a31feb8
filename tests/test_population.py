"""Populations (rnnjax.train.make_population_step): one compiled step (vmapped, or a lax.map over the
members) trains N models, and each member equals its individually trained twin."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import train
from rnnjax.models import language_model


def _setup(learning_rates, seeds):
    model = language_model(11, layers=1, hidden=16, embed=8, dropout=0.2)
    opt = train.default_optimizer(1e-2, total_steps=20, warmup_steps=2)
    states = []
    for lr, seed in zip(learning_rates, seeds):
        state = train.init_train_state(model.init(jax.random.key(seed)), opt, jax.random.key(100 + seed))
        states.append(state._replace(opt_state=train.set_hyperparams(state.opt_state, learning_rate=lr)))
    rng = np.random.default_rng(0)
    batches = [{"x": jnp.asarray(rng.integers(0, 11, size=(4, 9))), "y": jnp.asarray(rng.integers(0, 11, size=(4, 9)))}
               for _ in range(4)]
    return model, opt, states, batches


@pytest.mark.parametrize("strategy", ["vmap", pytest.param("map", marks=pytest.mark.slow)])
def test_each_member_equals_its_individually_trained_twin(strategy):
    lrs, seeds = [3e-3, 1e-2, 3e-2], [0, 1, 2]
    model, opt, states, batches = _setup(lrs, seeds)
    loss_fn = train.language_model_loss(model)
    population = train.stack_states(states)
    step = train.make_population_step(loss_fn, opt, strategy=strategy)
    losses = []
    for batch in batches:
        population, metrics = step(population, batch)
        losses.append(np.asarray(metrics["loss"]))
    assert train.population_size(population) == 3 and step._cache_size() == 1
    single = train.make_train_step(loss_fn, opt)
    for i, state in enumerate(states):
        twin_losses = []
        for batch in batches:
            state, metrics = single(state, batch)
            twin_losses.append(float(metrics["loss"]))
        np.testing.assert_allclose([l[i] for l in losses], twin_losses, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(train.member(population, i).params),
                        jax.tree_util.tree_leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # The members did differ: different seeds, learning rates and dropout keys.
    finals = [float(l) for l in losses[-1]]
    assert len(set(finals)) == 3


@pytest.mark.parametrize("strategy", ["vmap", pytest.param("map", marks=pytest.mark.slow)])
def test_members_with_their_own_batches(strategy):
    model, opt, states, batches = _setup([1e-2, 1e-2], [0, 0])
    loss_fn = train.language_model_loss(model)
    step = train.make_population_step(loss_fn, opt, shared_batch=False, strategy=strategy)
    population = train.stack_states(states)
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), batches[0], batches[1])
    population, metrics = step(population, stacked)
    single = train.make_train_step(loss_fn, opt)
    for i in range(2):
        _, m = single(states[i], batches[i])
        np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=1e-6)


def test_stack_states_errors():
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.train.stack_states: got no states. Fix: pass one TrainState per population member.") + "$"):
        train.stack_states([])
    model, opt, states, _ = _setup([1e-2], [0])
    other = language_model(11, layers=2, hidden=16, embed=8)
    odd = train.init_train_state(other.init(jax.random.key(0)), opt, jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.train.stack_states: member 1's state has a different structure from member 0's. Fix: build "
            "every member with the same model and optimiser (hyperparameters may differ).") + "$"):
        train.stack_states([states[0], odd])
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.train.make_population_step: unknown strategy 'pmap'; expected one of auto, vmap, map. Fix: pass "
            "one of those ('auto' picks 'map' on CPU and 'vmap' elsewhere).") + "$"):
        train.make_population_step(train.language_model_loss(model), opt, strategy="pmap")


def test_hyperparameters_of_a_population():
    model, opt, states, batches = _setup([1e-2, 1e-2, 1e-2], [0, 1, 2])
    population = train.stack_states(states)
    # One value for every member, or one per member; the schedule is each member's own.
    opt_state = train.set_hyperparams(population.opt_state, learning_rate=np.array([1e-3, 2e-3, 4e-3]))
    opt_state = train.set_hyperparams(opt_state, total_steps=40)
    assert opt_state.hyperparams["total_steps"].tolist() == [40, 40, 40]
    lrs = train.current_learning_rate(opt_state)  # step 0 of a 2-step warmup: zero; after one step, half the peak
    np.testing.assert_allclose(lrs, [0.0, 0.0, 0.0], atol=0)
    loss_fn = train.language_model_loss(model)
    step = train.make_population_step(loss_fn, opt, summarise=train.population_summary)
    population, metrics = step(population._replace(opt_state=opt_state), batches[0])
    twins = [train.make_train_step(loss_fn, opt)(s._replace(opt_state=train.set_hyperparams(
        s.opt_state, learning_rate=lr, total_steps=40)), batches[0])[1]["loss"] for s, lr in
        zip(states, [1e-3, 2e-3, 4e-3])]
    np.testing.assert_allclose(metrics["member_loss"], twins, rtol=1e-6)
    assert float(metrics["loss"]) == pytest.approx(float(np.mean(twins)), rel=1e-6)
    assert int(metrics["skipped"]) == 0 and metrics["member_skipped"].tolist() == [0, 0, 0]
    np.testing.assert_allclose(train.current_learning_rate(population.opt_state), [5e-4, 1e-3, 2e-3], rtol=1e-5)
    assert train.step_of(population) == 1


@pytest.mark.parametrize("strategy", ["vmap", pytest.param("map", marks=pytest.mark.slow)])
def test_members_with_a_carried_state_equal_their_twins(strategy):
    model, opt, states, batches = _setup([1e-2, 3e-2], [0, 1])
    loss_fn = train.language_model_loss(model, carry=True)
    step = train.make_population_step(loss_fn, opt, carry=True, strategy=strategy)
    carries = [model.initial_carry(s.params, (4,)) for s in states]
    population = train.stack_states(states)
    carry = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *carries)
    for batch in batches:
        population, carry, metrics = step(population, batch, carry)
    single = train.make_train_step(loss_fn, opt, carry=True)
    for i, (state, c) in enumerate(zip(states, carries)):
        for batch in batches:
            state, c, m = single(state, batch, c)
        np.testing.assert_allclose(metrics["loss"][i], m["loss"], rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves((train.member(population, i).params, jax.tree_util.tree_map(
                lambda x: x[i], carry))), jax.tree_util.tree_leaves((state.params, c))):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
