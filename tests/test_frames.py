"""rnnjax train frames: the moving digits against a per-sequence loop, the patches, and a tiny run end to end
(train, the test MSE and the baselines recomputed independently, eval)."""

import json

import jax
import numpy as np
import pytest

from rnnjax import checkpoint, cli
from rnnjax.data import frames as moving
from rnnjax.recipes import frames as recipe

pytest.importorskip("sklearn")


def _one_sequence_by_hand(images, seed, frames, size, digits):
    """The generator's draws replayed for each digit of the first sequence of a batch of one, moved and bounced
    one frame at a time with plain integers."""
    rng = np.random.default_rng(seed)
    out = np.zeros((frames, size, size), np.float32)
    span = size - 8
    for _ in range(digits):
        img = images[rng.integers(0, len(images), 1)[0]]
        (y, x), = rng.integers(0, span + 1, (1, 2))
        (vy, vx), = rng.choice(moving.SPEEDS, (1, 2))
        for t in range(frames):
            out[t, y:y + 8, x:x + 8] = np.maximum(out[t, y:y + 8, x:x + 8], img)
            if not 0 <= y + vy <= span:
                vy = -vy
            if not 0 <= x + vx <= span:
                vx = -vx
            y, x = y + vy, x + vx
    return out


def test_moving_digits_equal_a_frame_by_frame_loop_and_patches_round_trip():
    images = moving.digit_images("test")
    seq = moving.moving_digits(images, 1, frames=30, size=20, digits=3, seed=5)
    np.testing.assert_array_equal(seq[0], _one_sequence_by_hand(images, 5, 30, 20, 3))
    batch = moving.moving_digits(images, 4, seed=9)
    np.testing.assert_array_equal(batch, moving.moving_digits(images, 4, seed=9))
    patches = moving.to_patches(batch, 4)
    assert patches.shape == (4, 20, 8, 8, 16)
    np.testing.assert_array_equal(patches[1, 3, 2, 5].reshape(4, 4), batch[1, 3, 8:12, 20:24])
    np.testing.assert_array_equal(moving.from_patches(patches, 4), batch)
    train, val, test = (moving.digit_images(p) for p in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == 1797
    flat = lambda a: {im.tobytes() for im in a}  # noqa: E731
    assert not flat(train) & flat(test)


def test_frames_end_to_end_train_eval_and_the_scores_recomputed(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "frames", "--steps", "3", "--evals", "1", "--hidden", "4", "--layers", "1",
                     "--patch", "8", "--batch", "2", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    test = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert test["split"] == "test" and test["test_mse"] == printed["test_mse"]
    assert (out / "frames.png").read_bytes()[:4] == b"\x89PNG"

    # Independently: the test sequences rebuilt, the baselines and the model's MSE summed in NumPy.
    seqs = moving.moving_digits(moving.digit_images("test"), recipe.TEST_SEQUENCES, seed=2)
    future, last = seqs[:, 10:].astype(np.float64), seqs[:, 9:10]
    assert test["copy_last_mse"] == pytest.approx(np.mean((future - last) ** 2), abs=1e-6)  # 6 decimals kept
    assert test["blank_mse"] == pytest.approx(np.mean(future ** 2), abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    model = recipe.build_model(config["settings"], "test")
    ckpt, step = checkpoint.open_run(out, which="best")
    params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
    ckpt.close()
    inputs = moving.to_patches(seqs[:50, :19].copy(), 8)
    inputs[:, 10:] = 0.0
    pred = 1 / (1 + np.exp(-np.asarray(model.apply(params, inputs), np.float64)))[:, 9:]
    mse_50 = np.mean((moving.from_patches(pred, 8) - future[:50]) ** 2)
    pred_all = np.asarray(recipe._predict(model)(params, moving.to_patches(seqs, 8)), np.float64)
    assert np.mean((moving.from_patches(pred_all[:50], 8) - future[:50]) ** 2) == pytest.approx(mse_50, rel=1e-5)
    assert test["test_mse"] == pytest.approx(np.mean((moving.from_patches(pred_all, 8) - future) ** 2), abs=1e-6)

    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["test_mse"] == pytest.approx(test["test_mse"], abs=1e-6)
    assert cli.main(["train", "frames", "--patch", "5", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.endswith("rnnjax train frames: --patch 5 must divide the frame side, 32. Fix: pass "
                                            "1, 2, 4, 8 or 16.\n")
