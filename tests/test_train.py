"""rnnjax.train: the optimiser and its schedule, the train step (skipping, accumulation, TBPTT),
stream evaluation, early stopping and the training loop."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rnnjax import data, train
from rnnjax.models import language_model


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _close(a, b, atol=1e-6, rtol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                                                                   rtol=rtol), a, b)


# ----------------------------------------------------------------------------
# The optimiser


def test_warmup_cosine_matches_formula():
    peak, warmup, total, end = 3e-3, 10, 110, 0.1
    for count in [0, 1, 5, 10, 11, 60, 109, 110, 500]:
        if count < warmup:
            want = peak * count / warmup
        else:
            frac = min((count - warmup) / (total - warmup), 1.0)
            want = peak * end + (peak - peak * end) * 0.5 * (1 + math.cos(math.pi * frac))
        got = float(train.warmup_cosine(count, peak, warmup, total, end))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9), count


def test_default_optimizer_is_clip_then_adamw_with_the_schedule():
    """One update equals optax's own chain built by hand, for the same schedule values."""
    params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([0.5, -0.5])}
    grads = {"w": jnp.array([[10.0, -20.0], [5.0, 30.0]]), "b": jnp.array([1.0, 2.0])}
    opt = train.default_optimizer(1e-2, total_steps=50, warmup_steps=5, weight_decay=0.1, clip_norm=1.0)
    ref = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(lambda c: train.warmup_cosine(c, 1e-2, 5, 50, 0.1), b2=0.99, weight_decay=0.1,
                                  mask={"w": True, "b": False}))
    s, r = opt.init(params), ref.init(params)
    p, q = params, params
    for _ in range(7):
        u, s = opt.update(grads, s, p)
        v, r = ref.update(grads, r, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
    _close(p, q, atol=1e-7)
    assert train.current_learning_rate(s) == pytest.approx(float(train.warmup_cosine(7, 1e-2, 5, 50, 0.1)))


def test_weight_decay_only_on_matrices():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    opt = train.default_optimizer(0.1, total_steps=10, warmup_steps=1, weight_decay=0.5)
    state = opt.init(params)
    _, state = opt.update(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)  # count 1: peak lr
    updates, _ = opt.update(jax.tree_util.tree_map(jnp.zeros_like, params), state, params)
    assert float(jnp.abs(updates["b"]).max()) == 0.0  # zero gradients: biases stay
    np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # matrices: -lr * wd * w


def test_set_hyperparams_changes_schedule_without_recompiling():
    model = language_model(7, layers=1, hidden=8, embed=4)
    opt = train.default_optimizer(1e-2, total_steps=1000, warmup_steps=2)
    state = train.init_train_state(model.init(jax.random.key(0)), opt, jax.random.key(1))
    step = train.make_train_step(train.language_model_loss(model), opt)
    batch = {"x": jnp.ones((2, 5), jnp.int32), "y": jnp.ones((2, 5), jnp.int32)}
    for _ in range(3):
        state, _ = step(state, batch)
    before = train.current_learning_rate(state.opt_state)
    state = state._replace(opt_state=train.set_hyperparams(state.opt_state, total_steps=4))
    after = train.current_learning_rate(state.opt_state)
    assert before == pytest.approx(float(train.warmup_cosine(3, 1e-2, 2, 1000, 0.1)))
    assert after == pytest.approx(float(train.warmup_cosine(3, 1e-2, 2, 4, 0.1)))
    state, _ = step(state, batch)
    assert step._cache_size() == 1
    with pytest.raises(ValueError) as e:
        train.set_hyperparams(optax.adam(1e-3).init({"w": jnp.ones(2)}), total_steps=4)
    assert str(e.value) == ("rnnjax.train.set_hyperparams: the optimiser state has no hyperparameter(s) "
                            "['total_steps'] (it has none). Fix: build the optimiser with "
                            "rnnjax.train.default_optimizer or optax.inject_hyperparams.")


def test_default_optimizer_errors():
    with pytest.raises(ValueError) as e:
        train.default_optimizer(1e-3, total_steps=0)
    assert str(e.value) == ("rnnjax.train.default_optimizer: total_steps must be an integer >= 1, got 0. "
                            "Fix: pass the number of optimiser steps the run will take.")
    with pytest.raises(ValueError) as e:
        train.default_optimizer(1e-3, total_steps=10, warmup_steps=0)
    assert str(e.value) == ("rnnjax.train.default_optimizer: warmup_steps must be an integer >= 1, got 0. "
                            "Fix: pass e.g. warmup_steps=100, or None for the default.")


# ----------------------------------------------------------------------------
# The train step


def _quadratic_setup(nan_flag=True):
    def loss_fn(params, batch, key):
        loss = jnp.sum((params["w"] * batch["x"] - 1.0) ** 2)
        return jnp.where(batch["bad"], jnp.nan, loss) if nan_flag else loss

    opt = train.default_optimizer(0.1, total_steps=10, warmup_steps=1)
    state = train.init_train_state({"w": jnp.array([0.5, 2.0])}, opt, jax.random.key(0))
    return loss_fn, opt, state


def test_non_finite_step_is_skipped_and_counted():
    loss_fn, opt, state = _quadratic_setup()
    step = train.make_train_step(loss_fn, opt, donate=False)
    good = {"x": jnp.array([1.0, 1.0]), "bad": jnp.array(False)}
    bad = {"x": jnp.array([1.0, 1.0]), "bad": jnp.array(True)}
    state, m = step(state, good)
    assert int(m["skipped"]) == 0
    before = state
    state, m = step(state, bad)
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 2  # the batch was read
    assert _leaves_equal(state.params, before.params)  # bit for bit: nothing applied
    assert _leaves_equal(state.opt_state, before.opt_state)  # moments and schedule untouched
    state, m = step(state, good)
    assert int(m["skipped"]) == 0 and not _leaves_equal(state.params, before.params)
    # An infinite gradient with a finite loss is skipped too.
    inf_loss = lambda p, b, k: jnp.sum(jnp.sqrt(jnp.abs(p["w"] - b["x"])))  # noqa: E731  d/dw at w == x is inf
    step2 = train.make_train_step(inf_loss, opt, donate=False)
    s2, m = step2(state, {"x": state.params["w"]})
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 1 and _leaves_equal(s2.params, state.params)
    # So is a finite gradient whose global norm overflows float32 (the check is on the norm): (1e20)^2 > 3.4e38.
    step3 = train.make_train_step(lambda p, b, k: 1e20 * jnp.sum(p["w"]), opt, donate=False)
    s3, m = step3(state, good)
    assert np.isfinite(float(m["loss"])) and int(m["skipped"]) == 1 and _leaves_equal(s3.params, state.params)


def test_gradient_accumulation_equals_one_big_batch():
    """k micro-batches give the update of the whole batch, and each micro-batch's rows of the
    carry go through with it (a toy model with a carry: cheap to compile). Plain SGD, not Adam:
    Adam is nearly invariant to the gradient's scale, so it would hide a wrongly scaled mean."""

    def loss_fn(params, batch, key, carry):
        h = jnp.tanh(carry[0] * params["a"] + batch["x"] @ params["w"])  # [B, 3]
        loss = jnp.mean((h - batch["y"]) ** 2)
        return loss, (h, carry[1] + batch["x"].sum(-1))

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "a": jnp.float32(0.5)}
    batches = [{"x": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
                "y": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)} for _ in range(3)]
    opt = optax.sgd(0.5)
    results = []
    for k in (1, 4):
        state = train.init_train_state(params, opt, jax.random.key(1))
        carry = (jnp.zeros((8, 3)), jnp.zeros(8))
        step = train.make_train_step(loss_fn, opt, carry=True, accumulate=k, donate=False)
        for b in batches:
            state, carry, m = step(state, b, carry)
        results.append((state.params, carry, float(m["loss"]), float(m["grad_norm"])))
    _close(results[0][0], results[1][0], atol=1e-6)
    _close(results[0][1], results[1][1], atol=1e-6)
    assert results[0][2] == pytest.approx(results[1][2], rel=1e-5)
    assert results[0][3] == pytest.approx(results[1][3], rel=1e-5)
    with pytest.raises(ValueError) as e:
        train.make_train_step(loss_fn, opt, carry=True, accumulate=3)(state, batches[0], carry)
    assert str(e.value) == ("rnnjax.train.make_train_step: accumulate=3 must divide the batch size, got a leading "
                            "axis of 8. Fix: use a batch size that is a multiple of accumulate.")


def test_tbptt_carry_crosses_windows_and_resets_at_boundaries():
    model = language_model(9, layers=2, hidden=10, embed=5)
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (3, 13), 0, 9)
    x, y = ids[:, :12], ids[:, 1:]
    loss_fn = jax.jit(train.language_model_loss(model, carry=True))
    apply = jax.jit(model.apply)
    full_carry, full_logits = apply(params, x)
    xent = lambda logits, labels: float(train.cross_entropy(logits, labels))  # noqa: E731
    # Two windows with the carry passed across equal one pass over the whole sequence.
    c0 = model.initial_carry(params, (3,))
    no_reset = jnp.zeros((3, 6), bool)
    second = {"x": x[:, 6:], "y": y[:, 6:], "resets": no_reset}
    l1, c1 = loss_fn(params, {"x": x[:, :6], "y": y[:, :6], "resets": no_reset}, None, c0)
    l2, _ = loss_fn(params, second, None, c1)
    assert float(l1) == pytest.approx(xent(full_logits[:, :6], y[:, :6]), rel=1e-5)
    assert float(l2) == pytest.approx(xent(full_logits[:, 6:], y[:, 6:]), rel=1e-5)
    # A reset at the window's start reads it as a new text, whatever the carry.
    l2_reset, _ = loss_fn(params, {**second, "resets": no_reset.at[:, 0].set(True)}, None, c1)
    _, fresh = apply(params, x[:, 6:], carry=c0)
    assert float(l2_reset) == pytest.approx(xent(fresh, y[:, 6:]), rel=1e-5)
    # A reset in the middle of a window (a document boundary) starts afresh from there, in that row only.
    _, logits_mid = apply(params, x[:, 6:], carry=c1, resets=no_reset.at[1, 3].set(True))
    _, after = apply(params, x[:, 9:], carry=c0)
    np.testing.assert_allclose(logits_mid[1, 3:], after[1], atol=1e-5)
    np.testing.assert_allclose(logits_mid[0], full_logits[0, 6:], atol=1e-5)
    # The train step stops the gradient at the window's start: its update equals the gradient of the
    # second window's loss with the incoming carry held constant, and its carry is the state after
    # the whole sequence.
    opt = optax.sgd(1.0)
    step = train.make_train_step(train.language_model_loss(model, carry=True), opt, carry=True, donate=False)
    state = train.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params), jax.random.key(0))
    new_state, c_out, _ = step(state, second, c1)
    expected = jax.jit(jax.grad(lambda p, c: loss_fn(p, second, None, jax.lax.stop_gradient(c))[0]))(params, c1)
    _close(jax.tree_util.tree_map(lambda a, b: a - b, params, new_state.params), expected, atol=1e-6)
    _close(c_out, full_carry, atol=1e-5)


def test_train_step_compiles_once_and_lowers_the_loss():
    vocab = data.Vocabulary.from_text("abcdefgh ")
    ids = vocab.encode("abcdefgh " * 80)
    model = language_model(vocab.size, layers=1, hidden=32, embed=16)
    loss_fn = train.language_model_loss(model, carry=True)
    opt = train.default_optimizer(1e-2, total_steps=40)
    state = train.init_train_state(model.init(jax.random.key(0)), opt, jax.random.key(1))
    evaluate = train.stream_evaluator(model, data.lanes(ids[:200], 4))
    before = evaluate(state.params)
    assert abs(before - math.log(vocab.size)) < 0.3  # an untrained model is near uniform
    step = train.make_train_step(loss_fn, opt, carry=True)
    carry = model.initial_carry(state.params, (8,))
    stream = data.TokenStream(ids, 8, 16, seed=0)
    for batch in (next(stream) for _ in range(40)):
        state, carry, metrics = step(state, batch, carry)
    assert int(state.step) == 40
    assert evaluate(state.params) < 0.3 * before  # a repeated 9-character cycle is easy to learn
    assert step._cache_size() == 1  # compiled once: no retracing across steps


# ----------------------------------------------------------------------------
# Evaluation


def test_stream_evaluator_counts_every_target_once():
    model = language_model(6, layers=1, hidden=8, embed=4)
    params = model.init(jax.random.key(2))
    ids = np.random.default_rng(0).integers(0, 6, 103).astype(np.int32)
    lanes = data.lanes(ids, 4, doc_starts=np.array([50]))
    # Reference: read each lane whole in one apply (resetting at the document start), then average the
    # log-probabilities of the true next tokens by hand over the valid positions (NumPy).
    _, logits = jax.jit(model.apply)(params, lanes["x"], resets=lanes["resets"])
    logp = np.asarray(jax.nn.log_softmax(logits))
    nll = -np.take_along_axis(logp, lanes["y"][..., None], -1)[..., 0][lanes["mask"]]
    assert nll.size == 102
    for chunk in (7, 1000):
        got = train.stream_evaluator(model, lanes, chunk=chunk)(params)
        assert got == pytest.approx(float(np.mean(nll)), rel=1e-5)


# ----------------------------------------------------------------------------
# Early stopping and the loop


def test_early_stopping_counts_evaluations_without_improvement():
    es = train.EarlyStopping(patience=2, min_delta=0.01)
    decisions = [es.update(v, step) for step, v in enumerate([3.0, 2.0, 1.995, 1.5, 1.6, 1.7], start=1)]
    assert decisions == [False, False, False, False, False, True]
    assert es.best == 1.5 and es.best_step == 4
    again = train.EarlyStopping.from_dict(es.to_dict())
    assert again == es
    with pytest.raises(ValueError) as e:
        train.EarlyStopping(patience=0)
    assert str(e.value) == ("rnnjax.train.EarlyStopping: patience must be an integer >= 1 (evaluations without "
                            "improvement before stopping), got 0.")


def _loop_setup():
    loss_fn, opt, state = _quadratic_setup(nan_flag=False)
    step = train.make_train_step(loss_fn, opt)
    batches = iter(lambda: {"x": jnp.array([1.0, 1.0])}, None)
    return step, state, batches


def test_fit_evaluates_saves_and_stops_early():
    step, state, batches = _loop_setup()
    vals = iter([5.0, 4.0, 4.5, 4.4, 4.3, 4.2])
    saves = []
    res = train.fit(step, state, batches, total_steps=60, evaluate=lambda p: next(vals), evals=6,
                    early_stopping=train.EarlyStopping(patience=2),
                    save=lambda st, c, metrics, prog: saves.append((int(st.step), metrics, prog["skipped_steps"])))
    assert res.stop_reason == "early_stopping"
    assert [r["step"] for r in res.history] == [10, 20, 30, 40]
    assert [r["val_loss"] for r in res.history] == [5.0, 4.0, 4.5, 4.4]
    assert int(res.state.step) == 40
    assert [s[0] for s in saves] == [10, 20, 30, 40] and saves[-1][1] == {"val_loss": 4.4}
    assert set(res.history[0]) == {"step", "elapsed_s", "train_loss", "val_loss", "lr", "tokens_per_s"}


def test_fit_stops_when_asked_and_after_persistent_non_finite_steps():
    step, state, batches = _loop_setup()
    n = {"steps": 0}

    def stop_after_seven():
        n["steps"] += 1
        return n["steps"] >= 7

    saves = []
    res = train.fit(step, state, batches, total_steps=100, should_stop=stop_after_seven,
                    save=lambda st, c, m, p: saves.append(int(st.step)))
    assert res.stop_reason == "interrupted" and int(res.state.step) == 7 and saves == [7]

    loss_fn, opt, state = _quadratic_setup()
    nan_step = train.make_train_step(loss_fn, opt)
    bad = iter(lambda: {"x": jnp.array([1.0, 1.0]), "bad": jnp.array(True)}, None)
    res = train.fit(nan_step, state, bad, total_steps=100, max_consecutive_skipped=5)
    assert res.stop_reason == "not_finite" and res.skipped_steps == 5 and int(res.state.step) == 5


def test_fit_time_budget_fits_the_schedule(monkeypatch):
    """A clock that advances 1/64 s per training step and not otherwise (evaluations and saves take no time):
    after the compiling step and CALIBRATION_STEPS = 20 timed ones, the horizon is fitted to what is left of
    the 4 s less the reserve (1 s + 1% of the budget): 21 + int((4 - 21/64 - 1.04) * 64) = 189 steps; the
    first evaluation comes with the calibration, the other three at 1/3, 2/3 and all of the horizon."""
    step, state, batches = _loop_setup()
    clock = [1000.0]
    monkeypatch.setattr(train._Clock, "now", staticmethod(lambda: clock[0]))

    def ticking(state, batch):
        clock[0] += 1 / 64
        return step(state, batch)

    res = train.fit(ticking, state, batches, seconds=4.0, start_time=clock[0], evaluate=lambda p: 1.0, evals=3)
    assert res.stop_reason == "time"
    assert int(res.state.step) == int(res.state.opt_state.hyperparams["total_steps"]) == 189
    assert [r["step"] for r in res.history] == [21, 63, 126, 189]
    with pytest.raises(ValueError) as e:
        train.fit(step, state, batches)
    assert str(e.value) == ("rnnjax.train.fit: expected a budget: total_steps, seconds or both, got neither. "
                            "Fix: pass e.g. total_steps=1000 or seconds=300.")


def test_fit_records_extra_validation_metrics_and_stops_on_val_loss():
    step, state, batches = _loop_setup()
    vals = iter([{"val_loss": 2.0, "val_accuracy": 0.5}, {"val_loss": 3.0, "val_accuracy": 0.9},
                 {"val_loss": 3.0, "val_accuracy": 1.0}, {"val_loss": 1.0, "val_accuracy": 1.0}])
    res = train.fit(step, state, batches, total_steps=40, evaluate=lambda p: next(vals), evals=4,
                    early_stopping=train.EarlyStopping(patience=2))
    assert [(r["val_loss"], r["val_accuracy"]) for r in res.history] == [(2.0, 0.5), (3.0, 0.9), (3.0, 1.0)]
    assert res.stop_reason == "early_stopping"
