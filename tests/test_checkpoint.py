"""rnnjax.checkpoint: exact round trips, retention of the latest and the best, inference restores,
and the errors for missing, unfinished, damaged, foreign and mismatched checkpoints."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import checkpoint, train
from rnnjax.checkpoint import Checkpointer, CheckpointError
from rnnjax.models import LMParams, language_model


@pytest.fixture(scope="module")
def trained():
    """A model, a training state after two TBPTT steps, and the carry (one compilation per module)."""
    return _setup()


def _setup(hidden=8, steps=2):
    model = language_model(10, layers=1, hidden=hidden, embed=4)
    opt = train.default_optimizer(1e-2, total_steps=20, warmup_steps=2)
    state = train.init_train_state(model.init(jax.random.key(0)), opt, jax.random.key(1))
    step = train.make_train_step(train.language_model_loss(model, carry=True), opt, carry=True, donate=False)
    carry = model.initial_carry(state.params, (2,))
    ids = jnp.arange(12).reshape(2, 6) % 10
    for _ in range(steps):
        state, carry, _ = step(state, {"x": ids, "y": (ids + 1) % 10, "resets": jnp.zeros((2, 6), bool)}, carry)
    return model, state, carry


def _equal(a, b):
    ta, tb = jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b)
    assert ta == tb
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact_and_keeps_types(tmp_path, trained):
    model, state, carry = trained
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(2, state, carry=carry, meta={"note": "é"}, metrics={"val_loss": 2.5})
        assert not ckpt.save(2, state, carry=carry)  # an existing step is never rewritten
        ckpt.wait()
        restored, c, meta = ckpt.restore(2, jax.eval_shape(lambda: state), jax.eval_shape(lambda: carry))
    _equal(restored, state)  # NamedTuples stay NamedTuples, typed PRNG keys stay keys
    _equal(c, carry)
    assert isinstance(restored, train.TrainState) and isinstance(restored.params, LMParams)
    assert meta == {"note": "é", "rnnjax_checkpoint": 1, "step": 2, "metrics": {"val_loss": 2.5}}
    params, meta2 = checkpoint.restore_params(tmp_path, jax.eval_shape(lambda: state.params))
    _equal(params, state.params)
    assert meta2 == meta


def test_keeps_the_latest_and_the_best(tmp_path, trained):
    _, state, carry = trained
    ckpt = Checkpointer(tmp_path)
    for step, val in [(1, 3.0), (2, 2.0), (3, 2.5), (4, None), (5, 2.4)]:
        ckpt.save(step, state, carry=carry, metrics=None if val is None else {"val_loss": val})
        ckpt.wait()
    assert ckpt.steps() == [2, 5]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
    ckpt.close()
    ckpt, step = checkpoint.open_run(tmp_path, which="best")
    assert step == 2
    ckpt, step = checkpoint.open_run(tmp_path, which="latest")
    assert step == 5
    with pytest.raises(CheckpointError) as e:
        checkpoint.open_run(tmp_path, which=3)
    assert str(e.value) == (f"rnnjax.checkpoint.open_run: {str(tmp_path)!r} has no checkpoint at step 3; it has "
                            "steps 2, 5. Fix: pass one of those.")


def test_missing_empty_and_unfinished_directories(tmp_path, trained):
    abstract = jax.eval_shape(lambda: trained[1].params)
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(missing, abstract)
    assert str(e.value) == (f"rnnjax.checkpoint.restore_params: no directory at {str(missing)!r}; expected a run "
                            "directory written by `rnnjax train` (it holds checkpoints/). Fix: check the path, or "
                            "train a model first.")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(empty, abstract)
    assert str(e.value) == (f"rnnjax.checkpoint.restore_params: {str(empty)!r} holds no checkpoint (no "
                            "checkpoints/<step> folders); expected a run directory written by `rnnjax train`. "
                            "Fix: check the path, or train a model first.")
    partial = tmp_path / "partial"
    (partial / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000").mkdir(parents=True)
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(partial, abstract)
    assert str(e.value) == (f"rnnjax.checkpoint.restore_params: {str(partial)!r} holds only an unfinished "
                            "checkpoint (7.orbax-checkpoint-tmp-1700000000: the run stopped while saving it), "
                            "nothing that can be restored. Fix: train again (--overwrite), or pick the directory "
                            "of a run that saved a checkpoint.")
    assert (partial / "checkpoints" / "7.orbax-checkpoint-tmp-1700000000").is_dir()  # restoring deletes nothing


def test_damaged_foreign_and_mismatched_checkpoints(tmp_path, trained):
    model, state, carry = trained
    with Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(3, state, carry=carry, meta={})
    # A model of another size does not fit: every differing array is named.
    other = language_model(10, layers=1, hidden=9, embed=4)
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(tmp_path / "run", jax.eval_shape(other.init, jax.random.key(0)))
    msg = str(e.value)
    assert msg.startswith(f"rnnjax.checkpoint: the checkpoint at step 3 in {str(tmp_path / 'run' / 'checkpoints')!r} "
                          "does not fit the model: readout/w has float32[8, 10] in the checkpoint, the model "
                          "expects float32[9, 10]; ")
    assert msg.endswith("Fix: build the model with the settings it was trained with (they are in its meta), or "
                        "train a new one in another directory.")
    # A foreign checkpoint: written by Orbax, but without rnnjax's marker.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(tmp_path / "foreign" / "checkpoints", item_names=("params", "meta")) as m:
        m.save(5, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": jnp.ones(2)}),
                                          meta=ocp.args.JsonSave({"hello": 1})))
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(tmp_path / "foreign", {"w": jax.ShapeDtypeStruct((2,), jnp.float32)})
    assert str(e.value) == (f"rnnjax.checkpoint: step 5 in {str(tmp_path / 'foreign' / 'checkpoints')!r} is not an "
                            "rnnjax checkpoint (its meta has no 'rnnjax_checkpoint' = 1 marker). Fix: point at a "
                            "run directory written by `rnnjax train`.")
    # Damaged files: the array data of the params are gone.
    step_dir = tmp_path / "run" / "checkpoints" / "3"
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.name != "_METADATA" and "ocdbt" in str(f.relative_to(step_dir)):
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as e:
        checkpoint.restore_params(tmp_path / "run", jax.eval_shape(model.init, jax.random.key(0)))
    damaged = (f"rnnjax.checkpoint: the checkpoint at step 3 in {str(tmp_path / 'run' / 'checkpoints')!r} is "
               "damaged: {} cannot be read (a file in it is truncated, zeroed or missing); no other checkpoint is "
               f"readable. Fix: restore {str(step_dir)!r} from a backup, or train again.")
    assert str(e.value) == damaged.format("its parameters (params/)")
    # A damaged meta is reported the same way, by every entry point.
    (step_dir / "meta" / "metadata").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=re.escape(damaged.format("its meta (meta/)"))):
        checkpoint.open_run(tmp_path / "run")
