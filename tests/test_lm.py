"""rnnjax.models.lm, rnnjax.decode, rnnjax.train and the `rnnjax train charlm` command."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import cli, data, train
from rnnjax.decode import sample_logits
from rnnjax.models import generate, language_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cell,layers", [("lstm", 2), ("gru", 1), ("layer_norm_lstm", 2), ("elman", 1)])
def test_step_by_step_equals_apply(cell, layers):
    model = language_model(11, cell=cell, layers=layers, hidden=24, embed=12)
    params = model.init(jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (3, 9), 0, 11)
    _, logits = model.apply(params, ids)
    carry = model.initial_carry(params, (3,))
    step = jax.jit(model.step)
    stepped = []
    for t in range(ids.shape[1]):
        carry, logits_t = step(params, carry, ids[:, t])
        stepped.append(logits_t)
    np.testing.assert_allclose(np.stack(stepped, axis=1), logits, atol=1e-5, rtol=1e-5)
    # Continuing from a carry equals reading the whole sequence.
    c1, first = model.apply(params, ids[:, :4])
    _, second = model.apply(params, ids[:, 4:], carry=c1)
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), logits, atol=1e-5, rtol=1e-5)
    assert float(jnp.std(logits)) > 1e-3  # not a degenerate constant output


def test_apply_without_batch_dims_and_dropout():
    model = language_model(7, layers=2, hidden=16, embed=8, dropout=0.5)
    params = model.init(jax.random.key(0))
    ids = jnp.array([1, 2, 3, 4, 5, 6])
    _, batched = model.apply(params, ids[None])
    _, single = model.apply(params, ids)
    np.testing.assert_allclose(single, batched[0], atol=1e-6)
    _, a = model.apply(params, ids, key=jax.random.key(1))
    _, b = model.apply(params, ids, key=jax.random.key(2))
    assert float(jnp.abs(a - single).max()) > 1e-3  # dropout is on with a key
    assert float(jnp.abs(a - b).max()) > 1e-3  # and depends on it


def _argmax_decode(model, params, prompt, length):
    """Greedy decoding by re-reading the whole sequence with ``apply`` for every new token (no carry,
    no ``step``). The model is causal, so the zeros after the current position do not matter; the
    fixed buffer length means one compilation."""
    logits_of = jax.jit(lambda ids: model.apply(params, ids)[1])
    buf = np.zeros(len(prompt) + length, np.int32)
    buf[:len(prompt)] = prompt
    for i in range(len(prompt), len(buf)):
        buf[i] = int(np.argmax(logits_of(jnp.asarray(buf))[i - 1]))
    return buf[len(prompt):].tolist()


def test_generate_greedy_equals_independent_argmax_decoding():
    model = language_model(13, layers=2, hidden=32, embed=8)
    # Larger weights than at initialisation, so greedy decoding does not settle on one token.
    params = jax.tree_util.tree_map(lambda p: 3.0 * p, model.init(jax.random.key(4)))
    prompt = [3, 1, 4, 1, 5]
    expected = _argmax_decode(model, params, prompt, 12)
    assert len(set(expected)) > 1  # a non-trivial continuation
    greedy = generate(model, params, jax.random.key(0), jnp.array(prompt), 12, temperature=0)
    top1 = generate(model, params, jax.random.key(1), jnp.array(prompt), 12, temperature=1.0, top_k=1)
    tiny_p = generate(model, params, jax.random.key(2), jnp.array(prompt), 12, top_p=1e-6)
    assert greedy.tolist() == expected
    assert top1.tolist() == expected
    assert tiny_p.tolist() == expected
    # Batched prompts continue each row independently.
    rows = generate(model, params, jax.random.key(0), jnp.array([prompt, [2, 2, 2, 2, 2]]), 12, temperature=0)
    assert rows[0].tolist() == expected
    assert rows[1].tolist() == _argmax_decode(model, params, [2, 2, 2, 2, 2], 12)


def test_generate_samples_depend_on_key_and_respect_top_k():
    model = language_model(13, layers=1, hidden=16, embed=8)
    params = model.init(jax.random.key(0))
    a = generate(model, params, jax.random.key(1), jnp.array([1, 2]), 40)
    b = generate(model, params, jax.random.key(2), jnp.array([1, 2]), 40)
    assert a.dtype == jnp.int32 and a.tolist() != b.tolist()
    logits = jnp.array([[0.0, 3.0, 1.0, 2.5, -1.0]])
    keys = jax.random.split(jax.random.key(0), 500)
    picks = jax.vmap(lambda k: sample_logits(k, logits, top_k=2))(keys)
    assert set(np.asarray(picks).ravel().tolist()) == {1, 3}
    picks = jax.vmap(lambda k: sample_logits(k, logits, top_p=0.7))(keys)  # p(1)=0.53 < 0.7 <= p(1)+p(3)
    assert set(np.asarray(picks).ravel().tolist()) == {1, 3}


def test_generate_and_model_errors():
    model = language_model(5, layers=1, hidden=8)
    params = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("generate: expected a non-empty prompt")):
        generate(model, params, jax.random.key(0), jnp.zeros((0,), jnp.int32), 3)
    with pytest.raises(ValueError, match=re.escape("top_k must be None or an integer in [1, 5]")):
        generate(model, params, jax.random.key(0), jnp.array([1]), 3, top_k=6)
    with pytest.raises(ValueError) as e:
        language_model(5, cell="transformer")
    assert str(e.value) == ("rnnjax.models.language_model: unknown cell 'transformer'; expected one of "
                            "lstm, gru, elman, layer_norm_lstm, layer_norm_gru.")
    with pytest.raises(ValueError, match=re.escape("apply: expected integer token ids")):
        model.apply(params, jnp.ones((2, 3)))


def test_tiny_training_lowers_the_loss():
    vocab = data.Vocabulary.from_text("abcdefgh ")
    ids = vocab.encode("abcdefgh " * 80)
    model = language_model(vocab.size, layers=1, hidden=32, embed=16)
    loss_fn = train.language_model_loss(model)
    optimizer = train.default_optimizer(1e-2, total_steps=40)
    state = train.init_train_state(model.init(jax.random.key(0)), optimizer, jax.random.key(1))
    val = data.eval_batches(ids, batch_size=4, seq_len=16, num_batches=2)
    before = train.evaluate(loss_fn, state.params, val)
    assert abs(before - math.log(vocab.size)) < 0.3  # an untrained model is near uniform
    step = train.make_train_step(loss_fn, optimizer)
    stream = data.batches(ids, batch_size=8, seq_len=16, rng=0)
    losses = []
    for _ in range(40):
        state, metrics = step(state, next(stream))
        losses.append(float(metrics["loss"]))
    after = train.evaluate(loss_fn, state.params, val)
    assert int(state.step) == 40
    assert after < 0.5 * before  # a repeated 9-character cycle is easy to learn
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5
    assert step._cache_size() == 1  # compiled once: no retracing across steps


def _tiny_text(path):
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(150)), encoding="utf-8")
    return path


def test_cli_train_charlm_end_to_end(tmp_path, capsys):
    text = _tiny_text(tmp_path / "tiny.txt")
    out = tmp_path / "run"
    rc = cli.main(["train", "charlm", "--text", str(text), "--steps", "5", "--hidden", "16", "--embed", "8",
                   "--batch", "4", "--seq-len", "16", "--sample-length", "40", "--prompt", "to be",
                   "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    vocab_size = len(set(text.read_text()))
    for r in records:
        assert set(r) == {"step", "elapsed_s", "train_loss", "val_loss"}
        assert 0 < r["val_loss"] < math.log(vocab_size) + 0.5 and 0 < r["train_loss"] < math.log(vocab_size) + 0.5
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    written = (out / "sample.txt").read_text(encoding="utf-8")
    sample = written[:-1]
    assert sample.startswith("to be") and len(sample) == len("to be") + 40
    assert set(sample) <= set(text.read_text())
    assert capsys.readouterr().out == written  # printed as written
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 5 and config["vocab"]["chars"] == "".join(sorted(set(text.read_text())))


BAD_TEXTS = {
    "missing.txt": (None, "no file at '{path}'; expected a UTF-8 text file. Fix: check the path"),
    "empty.txt": (b"", "'{path}' is empty (0 bytes); expected text to model. Fix: pass a file that contains text.\n"),
    "x.bin": (b"\x7fELF\x00\x01", "'{path}' looks binary (it contains NUL bytes, the first at byte 4); "
                                  "expected a UTF-8 text file."),
    "latin1.txt": ("Æsop".encode("latin-1"), "'{path}' is not valid UTF-8 (byte 0xc6 at offset 0)"),
}


@pytest.mark.parametrize("name", sorted(BAD_TEXTS))
def test_cli_bad_text_exits_2_with_one_line(tmp_path, capsys, name):
    content, expected = BAD_TEXTS[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    rc = cli.main(["train", "charlm", "--text", str(path), "--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("rnnjax: error: rnnjax.data.read_text: " + expected.format(path=path))
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_bad_cell_and_prompt_exit_2(tmp_path, capsys):
    text = _tiny_text(tmp_path / "tiny.txt")
    assert cli.main(["train", "charlm", "--text", str(text), "--cell", "lsmt", "--steps", "1"]) == 2
    assert capsys.readouterr().err == ("rnnjax: error: unknown --cell 'lsmt'; expected one of lstm, gru, elman, "
                                       "layer_norm_lstm, layer_norm_gru.\n")
    assert cli.main(["train", "charlm", "--text", str(text), "--prompt", "ROMEO:", "--steps", "1",
                     "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnjax: error: --prompt 'ROMEO:' does not fit the text: rnnjax.data.Vocabulary.encode: "
                          "5 character(s) not in the vocabulary")
    assert err.count("\n") == 1


def test_python_dash_m_rnnjax_help():
    proc = subprocess.run([sys.executable, "-m", "rnnjax", "train", "charlm", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--seq-len" in proc.stdout and "layer_norm_gru" in proc.stdout
