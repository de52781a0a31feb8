"""rnnjax.models.lm, rnnjax.decode, rnnjax.train and the `rnnjax train charlm` command."""

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnnjax import checkpoint, cli, data, train
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


def test_generate_one_token_equals_greedy_decoding_also_without_jit():
    """One token has no sampling loop after the first (jax.disable_jit() refuses a scan of zero steps)."""
    model = language_model(9, cell="gru", layers=1, hidden=8, embed=4)
    params = model.init(jax.random.key(0))
    prompts = [[1, 2, 3], [4, 4, 0]]
    with jax.disable_jit():
        one = generate(model, params, jax.random.key(1), jnp.array(prompts), 1, temperature=0)
    assert one.tolist() == [_argmax_decode(model, params, p, 1) for p in prompts]


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
    with pytest.raises(ValueError) as e:
        generate(model, params, jax.random.key(0), jnp.zeros((0,), jnp.int32), 3)
    assert str(e.value) == ("rnnjax.models.generate: expected prompt_ids, a non-empty prompt of integer ids "
                            "[*batch, P] with P >= 1, got int32[0]. Fix: pass at least one integer token id per "
                            "row, e.g. vocab.encode(text).")
    with pytest.raises(ValueError) as e:
        generate(model, params, jax.random.key(0), jnp.array([1]), 3, top_k=6)
    assert str(e.value) == ("rnnjax.models.generate: top_k must be None or an integer in [1, 5] (the vocabulary "
                            "size), got 6. Fix: pass e.g. top_k=40, or None.")
    with pytest.raises(ValueError) as e:
        language_model(5, cell="transformer")
    assert str(e.value) == ("rnnjax.models.language_model: unknown cell 'transformer'; expected one of "
                            "lstm, gru, elman, layer_norm_lstm, layer_norm_gru, lru, mingru, minlstm, rglru, mgu, "
                            "slstm, mlstm, mamba. Fix: pass one of those names or a factory hidden_size -> Cell.")
    with pytest.raises(ValueError) as e:
        model.apply(params, jnp.ones((2, 3)))
    assert str(e.value) == ("rnnjax.models.language_model.apply: expected integer token ids of shape [*batch, T], "
                            "got float32[2, 3]. Fix: encode text with a Vocabulary (ids.astype(jnp.int32)).")


# ----------------------------------------------------------------------------
# The CLI: rnnjax train charlm / generate / eval


def _tiny_text(path, lines=150):
    rng = np.random.default_rng(0)
    words = "to be or not that is the question whether tis nobler in the mind".split()
    path.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(lines)), encoding="utf-8")
    return path


TINY = ["--hidden", "16", "--embed", "8", "--batch", "4", "--seq-len", "16"]


def _restore(run, which="latest", batch=None):
    """The model, params and meta of a run's checkpoint; with ``batch``, also the whole training
    state and TBPTT carry (restored into their own structures)."""
    ckpt, step = checkpoint.open_run(run, which=which)
    meta = ckpt.read_meta(step)
    cfg = dict(meta["model"])
    model = language_model(cfg.pop("vocab_size"), **cfg)
    params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
    full = None
    if batch is not None:
        abstract = jax.eval_shape(lambda: train.init_train_state(
            model.init(jax.random.key(0)), train.default_optimizer(total_steps=1), jax.random.key(0)))
        carry = jax.eval_shape(lambda: model.initial_carry(model.init(jax.random.key(0)), (batch,)))
        full = ckpt.restore(step, abstract, carry)[:2]
    ckpt.close()
    return model, params, meta, full


def _bits(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree_util.tree_leaves(tree)]


def _snapshot(path: Path):
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _validation_nll(model, params, ids) -> float:
    """The mean next-character loss over the validation part of ``ids`` (their last 10%), as charlm's trainer
    scores it, computed here without rnnjax.data.lanes or train.stream_evaluator: 64 contiguous lanes, each read
    from a fresh state, every target counted once, with a NumPy log-softmax."""
    val = np.asarray(ids)[round(len(ids) * 0.9):]
    n = len(val) - 1
    width = -(-n // 64)
    padded = np.concatenate([val, np.zeros(64 * width + 1 - len(val), val.dtype)])  # after the last target
    x, y = padded[:-1].reshape(64, width), padded[1:].reshape(64, width)
    logits = np.asarray(model.apply(params, jnp.asarray(x))[1], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.take_along_axis(log_p, y[..., None], -1).ravel()[:n].mean())


def test_cli_train_generate_eval_end_to_end(tmp_path, capsys):
    text = _tiny_text(tmp_path / "tiny.txt")
    out = tmp_path / "run"
    rc = cli.main(["train", "charlm", "--text", str(text), "--steps", "6", "--evals", "3", *TINY,
                   "--sample-length", "40", "--eval-sample-length", "10", "--prompt", "to be", "--out", str(out)])
    assert rc == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    vocab_size = len(set(text.read_text()))
    for r in records:
        assert {"step", "elapsed_s", "train_loss", "val_loss"} <= set(r)
        assert 0 < r["val_loss"] < math.log(vocab_size) + 0.5 and 0 < r["train_loss"] < math.log(vocab_size) + 0.5
    assert [r["elapsed_s"] for r in records] == sorted(r["elapsed_s"] for r in records)
    written = (out / "sample.txt").read_text(encoding="utf-8")
    sample = written[:-1]
    assert sample.startswith("to be") and len(sample) == len("to be") + 40
    assert set(sample) <= set(text.read_text())
    assert captured.out == written  # printed as written; progress goes to stderr
    assert "step 4: validation loss" in captured.err and "validation loss" in captured.err.splitlines()[-2]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((out / "config.json").read_text())
    assert config["budget"] == {"steps": 6, "seconds": None}
    assert config["vocab"]["chars"] == "".join(sorted(set(text.read_text())))
    assert config["settings"]["hidden"] == 16 and config["settings"]["text"] == str(text)

    # The checkpoint holds the vocabulary and model settings; generate continues the prompt with the
    # saved parameters, one step per character (equal to rnnjax.models.generate on the restored params).
    model, params, meta, _ = _restore(out)
    assert meta["vocab"] == config["vocab"] and meta["step"] == 6
    assert meta["metrics"]["val_loss"] == pytest.approx(records[-1]["val_loss"], abs=1e-5)
    vocab = data.Vocabulary.from_json(json.dumps(meta["vocab"]))
    # The final validation loss (unrounded in the checkpoint's meta), recomputed from the final parameters.
    assert _validation_nll(model, params, vocab.encode(text.read_text())) == pytest.approx(
        meta["metrics"]["val_loss"], abs=5e-6)
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "to be", "--length", "30", "--seed", "3",
                     "--top-k", "5"]) == 0
    ids = generate(model, params, jax.random.key(3), vocab.encode("to be"), 30, temperature=0.8, top_k=5)
    assert capsys.readouterr().out == "to be" + vocab.decode(np.asarray(ids)) + "\n"

    # eval on the run's own validation part reproduces the final validation loss.
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"lstm-1x16 at step 6: {records[-1]['val_loss']:.4f} nats/char")
    whole = tmp_path / "whole.txt"
    whole.write_text(text.read_text()[:300], encoding="utf-8")
    assert cli.main(["eval", "--checkpoint", str(out), "--text", str(whole)]) == 0
    assert capsys.readouterr().out.endswith(f"on all of {str(whole)!r}: 299 characters\n")
    # --window N scores separate windows from a fresh state: compare with apply on the windows.
    assert cli.main(["eval", "--checkpoint", str(out), "--text", str(whole), "--window", "16"]) == 0
    ids = vocab.encode(whole.read_text())
    windows = ids[:288].reshape(18, 16)
    targets = ids[1:289].reshape(18, 16)
    _, logits = model.apply(params, windows)
    nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None], -1).mean()
    assert capsys.readouterr().out == (
        f"lstm-1x16 at step 6: {nll:.4f} nats/char ({nll / math.log(2):.4f} bits/char, perplexity "
        f"{math.exp(nll):.2f}) on all of {str(whole)!r}, in 18 separate windows of 16 characters each read from a "
        "fresh state: 288 characters\n")

    # Bad input to generate and eval: one line, exit status 2.
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "ROMEO:"]) == 2
    assert capsys.readouterr().err == (
        "rnnjax: error: rnnjax generate: --prompt 'ROMEO:' has 5 character(s) outside the model's vocabulary of "
        f"{vocab_size}: ':', 'E', 'M', 'O', 'R'. Fix: use only characters of the training text.\n")
    greek = tmp_path / "greek.txt"
    greek.write_text("to be βήτα", encoding="utf-8")
    assert cli.main(["eval", "--checkpoint", str(out), "--text", str(greek)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax eval: {str(greek)!r} has characters the model's vocabulary lacks: 4 character(s) not "
        f"in the vocabulary of {vocab_size}: 'ή', 'α', 'β', 'τ'. Fix: use only characters of the training text, or "
        "build the vocabulary from a text that contains them.\n")

    # An existing run directory is never touched without --resume or --overwrite.
    before = _snapshot(out)
    assert cli.main(["train", "charlm", "--text", str(text), "--steps", "6", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax train charlm: --out {str(out)!r} already holds a run (checkpoints, config.json, "
        "loss.png, metrics.jsonl, sample.txt). Fix: pass --resume to continue it, --overwrite to start afresh "
        "(deletes its checkpoints and metrics), or choose another --out.\n")
    assert cli.main(["train", "charlm", "--resume", "--hidden", "32", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        "rnnjax: error: rnnjax train charlm: --resume continues a run with its own settings, and these differ: "
        "--hidden 32 (the run has 16). Fix: drop those flags, or start a new run in another --out.\n")
    assert _snapshot(out) == before

    # --overwrite replaces rnnjax's own files only.
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    assert cli.main(["train", "charlm", "--text", str(text), "--steps", "2", "--overwrite", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax train charlm: --overwrite only replaces an rnnjax run, and {str(out)!r} also holds: "
        "notes.txt; nothing was deleted. Fix: choose another --out.\n")
    assert _snapshot(out) == {**before, "notes.txt": b"mine"}
    (out / "notes.txt").unlink()
    assert cli.main(["train", "charlm", "--text", str(text), "--steps", "2", "--evals", "1", *TINY,
                     "--sample-length", "0", "--eval-sample-length", "0", "--prompt", "to be", "--overwrite",
                     "--out", str(out)]) == 0
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [2]
    assert checkpoint.open_run(out)[1] == 2 and not (out / "sample.txt").exists()


def _run_cli_subprocess(args, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "rnnjax", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(run: Path, proc, at_least: int, timeout=120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ckpts = run / "checkpoints"
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if steps and max(steps) >= at_least:
            return max(steps)
        assert proc is None or proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow  # tests/test_faults.py stops (SIGTERM) and resumes a run exactly in the default run
def test_cli_ctrl_c_and_kill_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    """A run stopped by Ctrl-C, resumed, killed with SIGKILL mid-run (maybe mid-save), and resumed
    again ends with exactly the parameters, optimiser state, key and carry of a run never stopped."""
    text = _tiny_text(tmp_path / "tiny.txt", lines=400)
    common = ["train", "charlm", "--text", str(text), "--steps", "80", "--evals", "4", *TINY, "--dropout", "0.1",
              "--sample-length", "0", "--eval-sample-length", "0", "--seed", "5"]
    reference = tmp_path / "reference"
    assert cli.main([*common, "--out", str(reference)]) == 0

    # Ctrl-C, in this process: a thread sends SIGINT once a checkpoint of step 10 or later is written.
    run = tmp_path / "run"
    sender = threading.Thread(target=lambda: (_wait_for_checkpoint(run, None, 10), os.kill(os.getpid(), signal.SIGINT)))
    sender.start()
    assert cli.main([*common, "--out", str(run), "--save-every-steps", "5"]) == 130
    sender.join()
    err = capsys.readouterr().err
    stopped = checkpoint.open_run(run)[1]
    assert (f"rnnjax: interrupted; checkpoint of step {stopped} saved in {str(run / 'checkpoints')!r}. Resume with: "
            f"rnnjax train charlm --out {run} --resume") in err.splitlines()
    assert 10 <= stopped < 80 and "Traceback" not in err

    # SIGKILL, in another process: no chance to save; the last checkpoint may even be half written.
    proc = _run_cli_subprocess(["train", "charlm", "--out", str(run), "--resume"], tmp_path)  # saves every 5 steps
    _wait_for_checkpoint(run, proc, stopped + 10)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.open_run(run)[1]
    assert stopped + 10 <= killed_at < 80

    assert cli.main(["train", "charlm", "--out", str(run), "--resume"]) == 0
    _, _, meta_a, full_a = _restore(reference, batch=4)
    _, _, meta_b, full_b = _restore(run, batch=4)
    assert meta_a["step"] == meta_b["step"] == 80
    bits_a, bits_b = _bits(full_a), _bits(full_b)  # params, optimiser state, step, key and carry
    assert len(bits_a) == len(bits_b) > 10
    for a, b in zip(bits_a, bits_b):
        np.testing.assert_array_equal(a, b)  # bit for bit
    hist_a = [(r["step"], r["val_loss"]) for r in meta_a["progress"]["history"]]
    hist_b = [(r["step"], r["val_loss"]) for r in meta_b["progress"]["history"]]
    assert hist_a == hist_b and [s for s, _ in hist_a] == [20, 40, 60, 80]
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [20, 40, 60, 80]


BAD_TEXTS = {
    "missing.txt": (None, "no file at {path!r}; expected a UTF-8 text file. Fix: check the path (relative paths "
                          "start from {cwd!r})."),
    "empty.txt": (b"", "{path!r} is empty (0 bytes); expected text to model. Fix: pass a file that contains text."),
    "x.bin": (b"\x7fELF\x00\x01", "{path!r} looks binary (it contains NUL bytes, the first at byte 4); expected a "
                                  "UTF-8 text file. Fix: pass a plain-text file, not an archive, image or compiled "
                                  "file."),
    "latin1.txt": ("Æsop".encode("latin-1"), "{path!r} is not valid UTF-8 (byte 0xc6 at offset 0); expected a UTF-8 "
                                             "text file. Fix: convert it first, e.g. `iconv -f latin1 -t utf-8 IN > "
                                             "OUT` (use the file's real encoding)."),
}


@pytest.mark.parametrize("name", sorted(BAD_TEXTS))
def test_cli_bad_text_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, name):
    content, expected = BAD_TEXTS[name]
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    rc = cli.main(["train", "charlm", "--text", str(path), "--steps", "1", "--out", str(tmp_path / "run")])
    assert rc == 2
    assert capsys.readouterr().err == ("rnnjax: error: rnnjax.data.read_text: "
                                       f"{expected.format(path=str(path), cwd=os.getcwd())}\n")
    assert not (tmp_path / "run").exists()


def test_cli_text_shorter_than_one_batch(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("to be or not to be, " * 20, encoding="utf-8")  # 400 characters: 360 to train on
    assert cli.main(["train", "charlm", "--text", str(text), "--steps", "1", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax train charlm: the training part of {str(text)!r} (its first 90%: 360 characters) is "
        "shorter than one batch of --batch 64 x --seq-len 8 = 512 characters (plus 8 for the targets). Fix: use "
        "a longer text, or a smaller --batch (e.g. --batch 22).\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("cell, heads", [("mgu", 1), ("gru", 4)])
def test_charlm_builds_mgu_and_multi_head_cells(cell, heads):
    from rnnjax import cells, unroll
    from rnnjax.recipes import charlm

    settings = dict(charlm.DEFAULTS, cell=cell, hidden=16, embed=8, heads=heads, dtype="float32")
    model = charlm.build_model(charlm.model_config(settings, 11), "rnnjax train charlm")
    params = model.init(jax.random.key(0))
    assert params.rnn.layers[0].w_hh.shape == ((16, 32) if cell == "mgu" else (4, 4, 12))
    # The model is the directly built cell read over the embeddings, then the readout.
    direct = cells.mgu(16) if cell == "mgu" else cells.gru(16, heads=heads)
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, 11)
    _, hs = unroll(direct, params.rnn.layers[0], params.embed[ids])
    expected = np.asarray(hs) @ np.asarray(params.readout.w) + np.asarray(params.readout.b)
    np.testing.assert_allclose(model.apply(params, ids)[1], expected, rtol=1e-5, atol=1e-5)


def test_cli_heads_only_for_lstm_gru_elman(tmp_path, capsys):
    text = _tiny_text(tmp_path / "tiny.txt")
    assert cli.main(["train", "charlm", "--text", str(text), "--cell", "mgu", "--heads", "2", "--steps", "1"]) == 2
    assert capsys.readouterr().err == ("rnnjax: error: rnnjax train charlm: --heads 2 applies to the cells lstm, gru, "
                                       "elman, got --cell mgu. Fix: drop --heads or choose one of those cells.\n")


def test_cli_bad_cell_prompt_and_resume_exit_2(tmp_path, capsys):
    text = _tiny_text(tmp_path / "tiny.txt")
    assert cli.main(["train", "charlm", "--text", str(text), "--cell", "lsmt", "--steps", "1"]) == 2
    assert capsys.readouterr().err == ("rnnjax: error: unknown --cell 'lsmt'; expected one of lstm, gru, elman, "
                                       "layer_norm_lstm, layer_norm_gru, lru, mingru, minlstm, rglru, mgu, slstm, "
                                       "mlstm, mamba.\n")
    assert cli.main(["train", "charlm", "--text", str(text), "--prompt", "ROMEO:", "--steps", "1",
                     "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        "rnnjax: error: rnnjax train charlm: --prompt 'ROMEO:' has 5 character(s) outside the model's vocabulary "
        "of 18: ':', 'E', 'M', 'O', 'R'. Fix: use only characters of the training text.\n")
    assert cli.main(["train", "charlm", "--resume", "--out", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax train charlm: --resume found no run in {str(tmp_path / 'nothing')!r} (the directory "
        "is missing or empty). Fix: drop --resume to start a new run, or point --out at an existing run.\n")
    assert not (tmp_path / "run").exists() and not (tmp_path / "nothing").exists()


def test_cli_reset_every_reaches_the_stream_and_an_older_run_resumes_without_it(tmp_path):
    """--reset-every sets the stream's periodic fresh starts, spread over the streams; a run saved before the flag
    existed resumes with the stream it started with (none), and one saved before the spread with consecutive
    ones, not with today's defaults."""
    from rnnjax import engine
    from rnnjax.recipes import charlm

    text, run = _tiny_text(tmp_path / "tiny.txt"), tmp_path / "run"
    assert cli.main(["train", "charlm", "--text", str(text), "--steps", "2", "--evals", "1", *TINY, "--reset-every",
                     "3", "--sample-length", "0", "--eval-sample-length", "0", "--out", str(run)]) == 0

    def resumed_stream():
        return charlm.prepare(engine.plan_run(charlm.RECIPE, {}, {"out": str(run), "resume": True})).batches

    assert (resumed_stream().reset_every, resumed_stream().stagger) == (3, "spread")
    config = json.loads((run / "config.json").read_text())
    del config["settings"]["reset_stagger"]  # saved before the fresh starts were spread over the streams
    (run / "config.json").write_text(json.dumps(config))
    assert (resumed_stream().reset_every, resumed_stream().stagger) == (3, "consecutive")
    del config["settings"]["reset_every"]  # saved before --reset-every
    (run / "config.json").write_text(json.dumps(config))
    assert resumed_stream().reset_every is None
    assert charlm.DEFAULTS["reset_every"] == 256  # the default the docs give


def test_cli_generate_and_eval_bad_checkpoints(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert cli.main(["generate", "--checkpoint", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax generate: no directory at {str(missing)!r}; expected a run directory written by "
        "`rnnjax train` (it holds checkpoints/). Fix: check the path, or train a model first.\n")
    foreign = tmp_path / "foreign"
    (foreign / "photos").mkdir(parents=True)
    assert cli.main(["eval", "--checkpoint", str(foreign)]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax eval: {str(foreign)!r} holds no checkpoint (no checkpoints/<step> folders); expected "
        "a run directory written by `rnnjax train`. Fix: check the path, or train a model first.\n")
    corrupt = tmp_path / "corrupt" / "checkpoints" / "12"
    corrupt.mkdir(parents=True)
    (corrupt / "meta").mkdir()
    (corrupt / "meta" / "metadata").write_text("{truncated", encoding="utf-8")
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "corrupt")]) == 2
    assert capsys.readouterr().err == (
        f"rnnjax: error: rnnjax.checkpoint: the checkpoint at step 12 in {str(tmp_path / 'corrupt' / 'checkpoints')!r} "
        "is damaged: its meta (meta/) cannot be read (a file in it is truncated, zeroed or missing); no other "
        f"checkpoint is readable. Fix: restore {str(corrupt)!r} from a backup, or train again.\n")
    assert _snapshot(tmp_path / "corrupt")  # untouched: still there


def test_python_dash_m_rnnjax_help():
    proc = subprocess.run([sys.executable, "-m", "rnnjax", "train", "charlm", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "--seq-len" in proc.stdout and "layer_norm_gru" in proc.stdout and "--resume" in proc.stdout


def test_cli_dtype_bfloat16_trains_the_policy_and_eval_reads_it_back(tmp_path, capsys):
    """--dtype bfloat16: float32 master weights, bfloat16 products; eval rebuilds the same model from the config and
    reproduces the recorded validation loss."""
    from rnnjax.recipes import charlm

    text = _tiny_text(tmp_path / "tiny.txt")
    out = tmp_path / "run"
    assert cli.main(["train", "charlm", "--text", str(text), "--steps", "4", "--evals", "1", *TINY,
                     "--dtype", "bfloat16", "--sample-length", "0", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["settings"]["dtype"] == "bfloat16"
    assert config["model"]["dtype"] == "bfloat16"  # the settings the trainer built its model from
    # eval builds its model with the trainer's builder: its logits are the bfloat16 policy's, not float32's.
    model, params, vocab, _ = charlm.load(argparse.Namespace(checkpoint=str(out), step=None, latest=False),
                                          "rnnjax eval")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    cfg = {k: v for k, v in config["model"].items() if k != "dtype"}
    ids = vocab.encode(text.read_text())
    logits = model.apply(params, ids[:64])[1]
    as_bf16, as_f32 = (language_model(**cfg, dtype=d).apply(params, ids[:64])[1] for d in (jnp.bfloat16, None))
    np.testing.assert_allclose(logits, as_bf16, rtol=0, atol=1e-6)
    assert float(jnp.abs(logits - as_f32).max()) > 1e-4  # bfloat16 rounding (about 1e-3 here), not float32's
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["val_loss"] == pytest.approx(_validation_nll(model, params, ids), abs=1e-5)
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"lstm-1x16 at step 4: {record['val_loss']:.4f} nats/char")


def test_cli_info_names_the_backend_per_cell(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rnnjax ") and "native kernels: " in out
    assert "  lstm(peepholes=True), float32 compute: backend='auto' runs xla (native cannot run it: the cell 'lstm' " \
           "has no native kernel with these settings" in out


def test_dtype_auto_is_bfloat16_only_where_the_native_kernels_run_it(monkeypatch):
    from rnnjax import native
    from rnnjax.recipes import flags

    assert flags.resolve_dtype("float32", "lstm") == "float32"
    assert flags.resolve_dtype("bfloat16", "mingru") == "bfloat16"
    assert flags.resolve_dtype("auto", "mingru") == "float32"  # linear cells run on XLA, where bf16 is slower
    monkeypatch.setattr(native, "status", lambda: native.Status(True, "loaded"))
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512_bf16"}))
    assert flags.resolve_dtype("auto", "lstm") == "bfloat16"
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert flags.resolve_dtype("auto", "lstm") == "float32"
    monkeypatch.setattr(native, "status", lambda: native.Status(False, "not built"))
    assert flags.resolve_dtype("auto", "gru") == "float32"
