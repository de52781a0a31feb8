"""CMUdict reading and splitting, error rates, bucketed batches, and the `rnnjax train g2p` / `rnnjax g2p` CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from rnnjax import cli
from rnnjax.data import g2p
from rnnjax.metrics import edit_distance, error_rates

DICT = """\
;;; a comment line is not an entry
abc EY1 B IY1 S IY1
abc(2) AE1 B K
abc(3) EY0 B IY0 S IY0
bad B AE1 D # a comment
"""


def test_read_cmudict_strips_stress_comments_and_merges_alternatives(tmp_path):
    path = tmp_path / "d.dict"
    path.write_text(DICT.replace(";;; a comment line is not an entry\n", ""), encoding="utf-8")
    assert g2p.read_cmudict(path) == {"abc": [("EY", "B", "IY", "S", "IY"), ("AE", "B", "K")],
                                      "bad": [("B", "AE", "D")]}


def test_the_installed_cmudict_and_its_split():
    entries = g2p.read_cmudict()
    assert len(entries) > 120_000 and entries["hello"] == [("HH", "AH", "L", "OW"), ("HH", "EH", "L", "OW")]
    phonemes = {p for prons in entries.values() for pron in prons for p in pron}
    assert len(phonemes) == 39
    train, dev, test = g2p.split_words(entries)
    assert len(train) + len(dev) + len(test) == len(entries)
    assert not (set(train) & set(dev)) and not (set(train) & set(test)) and not (set(dev) & set(test))
    assert abs(len(test) - 0.05 * len(entries)) <= 1
    order = np.random.default_rng(g2p.SEED).permutation(len(entries))  # the documented recipe
    assert train[:3] == [sorted(entries)[i] for i in order[:3]]
    assert g2p.split_words(entries, seed=g2p.SEED + 1)[2][:20] != test[:20]


def test_edit_distance_and_error_rates():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["A", "B"]) == 2 and edit_distance(["A"], ["A"]) == 0
    preds = [("K", "AE", "T"), ("D", "AO", "G"), ("HH", "AH", "L", "OW")]
    refs = [[("K", "AE", "T")], [("D", "AA", "G"), ("D", "AO", "G", "Z")], [("HH", "EH", "L", "OW"), ("HH", "AH", "L")]]
    rates = error_rates(preds, refs)
    # item 2: 1 edit against either reference, the shorter (3) counts; item 3: 1 edit against both, length 3
    assert (rates["edits"], rates["ref_tokens"], rates["errors"]) == (2, 9, 2)
    assert rates["per"] == pytest.approx(2 / 9) and rates["wer"] == pytest.approx(2 / 3)
    assert error_rates([("A",)], [[("B",), ("A",)]])["wer"] == 0.0


def test_bucketed_batches_resume_and_cover_the_data():
    src = [np.arange(1, 1 + n, dtype=np.int32) for n in [3, 5, 7, 9, 11, 4, 6, 8] * 12]
    tgt = [s + 2 for s in src]
    a = g2p.BucketedBatches(src, tgt, 4, seed=3)
    first = [next(a) for _ in range(2 * a.per_epoch)]
    b = g2p.BucketedBatches(src, tgt, 4, seed=3, start_step=a.per_epoch + 2)
    c = g2p.BucketedBatches(src, tgt, 4, seed=3)
    c.position = a.per_epoch + 2
    for x, y, z in zip(first[a.per_epoch + 2:], b, c):
        for k in x:
            np.testing.assert_array_equal(x[k], z[k])
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    seen = sorted(int(n) for batch in first[:a.per_epoch] for n in batch["src_lengths"])
    assert seen == sorted(len(s) for s in src)  # 96 examples, 12 or more of each bucket: all in one epoch
    for batch in first:
        S, T = batch["src"].shape[1], batch["tgt_in"].shape[1]
        assert (S, T) in g2p.BUCKETS
        i = 0
        n = batch["src_lengths"][i]
        assert list(batch["tgt_in"][i, :n + 1]) == [g2p.BOS] + list(batch["src"][i, :n] + 2)
        assert list(batch["tgt_out"][i, :n + 1]) == list(batch["src"][i, :n] + 2) + [g2p.EOS]


def test_symbols_reject_unknown_characters():
    data = g2p.Symbols(tuple("abc"), ("<pad>",), "character(s)")
    np.testing.assert_array_equal(data.encode("cab"), [3, 1, 2])
    with pytest.raises(ValueError, match=re.escape(
            "rnnjax.data.g2p.Symbols.encode: 2 character(s) not in the vocabulary: '!', 'z'; expected only 'abc'. "
            "Fix: remove or replace them.")):
        data.encode("az!")


# ----------------------------------------------------------------------------
# CLI on a small dictionary

WORDS = ["cat", "cab", "bat", "tab", "act", "bad", "dab", "cad", "tad", "dot", "cot", "bot", "tot", "cob", "bob",
         "tod", "doc", "toad", "boat", "coat", "goat", "gat", "tag", "bag", "cog", "dog", "bog", "god", "got", "tog"]
PH = {"a": "AE", "b": "B", "c": "K", "d": "D", "g": "G", "o": "AA", "t": "T"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("g2p")
    lines = [f"{w} {' '.join(PH[c] + '1' for c in w.replace('oa', 'o'))}" for w in WORDS]
    (root / "tiny.dict").write_text("\n".join(lines) + "\ncat(2) K AH1 T\n", encoding="utf-8")
    out = root / "run"
    status = cli.main(["train", "g2p", "--data", str(root / "tiny.dict"), "--hidden", "8", "--decoder-hidden", "8",
                       "--embed", "4", "--batch", "4", "--steps", "6", "--evals", "1", "--out", str(out),
                       "--no-plot"])
    assert status == 0
    return root, out


def test_cli_pronounces_words_nbest_and_heatmap(run, capsys):
    root, out = run
    capsys.readouterr()
    assert cli.main(["g2p", "--checkpoint", str(out), "cat", "Dog", "--nbest", "3",
                     "--heatmap", str(root / "cat.png")]) == 0
    lines = capsys.readouterr().out.strip().split("\n")
    assert [ln.split("\t")[:2] for ln in lines] == [["cat", "1"], ["cat", "2"], ["cat", "3"], ["Dog", "1"],
                                                    ["Dog", "2"], ["Dog", "3"]]
    logps = [float(ln.split("\t")[2]) for ln in lines[:3]]
    assert logps == sorted(logps, reverse=True)
    assert (root / "cat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --eval equals the error rates of the words' own greedy pronunciations, computed here
    test = g2p.load_g2p(root / "tiny.dict").test
    assert cli.main(["g2p", "--checkpoint", str(out), *test]) == 0
    preds = [tuple(ln.split("\t")[1].split()) for ln in capsys.readouterr().out.strip().split("\n")]
    r = error_rates(preds, [test[w] for w in test])
    assert cli.main(["g2p", "--checkpoint", str(out), "--eval", "test"]) == 0
    assert capsys.readouterr().out.startswith(
        f"test: {len(test)} words, greedy: PER {100 * r['per']:.2f}% ({r['edits']} edits / {r['ref_tokens']} "
        f"phonemes), WER {100 * r['wer']:.2f}% ({r['errors']} words wrong) [")


@pytest.mark.parametrize("argv,message", [
    (["", "--beam", "2"], "rnnjax g2p: got an empty word; expected at least one character. Fix: drop it."),
    (["cat9"], "rnnjax g2p: word 'cat9': 1 character(s) not in the vocabulary: '9'; expected only 'abcdgot'. "
               "Fix: remove or replace them."),
    (["cat", "--beam", "10"], "rnnjax g2p: --beam 10 is wider than the 9 phoneme symbols it can emit (the "
                              "vocabulary's 11 but <pad> and <s>). Fix: pass --beam 9 or less."),
    (["cat", "--nbest", "4", "--beam", "2"], "rnnjax g2p: --nbest 4 exceeds --beam 2. Fix: pass --beam 4 or more."),
    ([], "rnnjax g2p: expected one or more WORDs or --eval dev|test, got neither. Fix: e.g. rnnjax g2p "
         "--checkpoint runs/g2p hello world."),
])
def test_cli_bad_input(run, capsys, argv, message):
    _, out = run
    capsys.readouterr()
    assert cli.main(["g2p", "--checkpoint", str(out), *argv]) == 2
    assert capsys.readouterr().err == f"rnnjax: error: {message}\n"


def test_eval_generate_and_help_of_a_g2p_run(run, capsys):
    root, out = run
    capsys.readouterr()
    # `rnnjax eval` finds the task in config.json: the dev loss of the best checkpoint, as training recorded it.
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert printed["step"] == record["step"] == 6 and abs(printed["val_loss"] - record["val_loss"]) < 1e-5
    # `rnnjax generate` transcribes words as `rnnjax g2p` does.
    assert cli.main(["g2p", "--checkpoint", str(out), "cat", "dog"]) == 0
    alias = capsys.readouterr().out
    assert cli.main(["generate", "--checkpoint", str(out), "cat", "dog"]) == 0
    assert capsys.readouterr().out == alias and alias.startswith("cat\t")
    with pytest.raises(SystemExit):
        cli.main(["train", "g2p", "--help"])
    shown = capsys.readouterr().out
    assert all(flag in shown for flag in ("--patience", "--accumulate", "--save-every-steps", "--devices",
                                          "--population", "--resume"))


def _early_stop(records: list, patience: int, min_delta: float) -> tuple[int, float, int] | None:
    """Where early stopping should stop, from the recorded validation losses: ``(index of the evaluation,
    best loss, its step)`` at the first evaluation that makes ``patience`` in a row without an improvement
    of more than ``min_delta`` on the best so far; None when none does."""
    best, best_step, bad = math.inf, None, 0
    for i, r in enumerate(records):
        if r["val_loss"] < best - min_delta:
            best, best_step, bad = r["val_loss"], r["step"], 0
        else:
            bad += 1
        if bad == patience:
            return i, best, best_step
    return None


def test_g2p_population_and_early_stopping_run_on_the_engine(run, capsys):
    root, _ = run
    out = root / "pop"
    # Two members, evaluated after each of the 4 steps; the validation loss (the best member's) counts as improved
    # only when it falls by more than 0.01, which a few tiny steps never do: patience 2 stops the run at its
    # third evaluation, step 3, before the step budget.
    assert cli.main(["train", "g2p", "--data", str(root / "tiny.dict"), "--hidden", "8", "--decoder-hidden", "8",
                     "--embed", "4", "--batch", "4", "--steps", "4", "--evals", "4", "--lr", "3e-3,1e-7",
                     "--patience", "2", "--min-delta", "0.01", "--no-plot", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "a population of 2 (seeds 0..1, lr 0.003,1e-07) in one compiled step" in err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["member_val_loss"]) == 2 and r["val_loss"] == min(r["member_val_loss"]) for r in records)
    assert "rnnjax: score it with: rnnjax g2p --checkpoint" in err
    stop = _early_stop(records, 2, 0.01)
    assert stop is not None and stop[0] == len(records) - 1  # the run's last evaluation is the one that stops it
    assert [r["step"] for r in records] == [1, 2, 3] and "; stopped: early_stopping\n" in err
    assert f"rnnjax: early stopping: no improvement for 2 evaluations (best {stop[1]:.4f} at step {stop[2]})\n" in err


@pytest.mark.slow
def test_g2p_resume_continues_from_the_checkpoint_and_refuses_other_settings(run, capsys):
    root, _ = run
    out = root / "resumed"
    tiny = ["train", "g2p", "--data", str(root / "tiny.dict"), "--hidden", "8", "--decoder-hidden", "8", "--embed", "4",
            "--batch", "4", "--evals", "1", "--no-plot", "--out", str(out)]
    assert cli.main([*tiny, "--steps", "3"]) == 0
    capsys.readouterr()
    assert cli.main([*tiny, "--steps", "5", "--resume", "--hidden", "16"]) == 2
    assert capsys.readouterr().err == (
        "rnnjax: error: rnnjax train g2p: --resume continues a run with its own settings, and these differ: --hidden "
        "16 (the run has 8). Fix: drop those flags, or start a new run in another --out.\n")
    assert cli.main([*tiny, "--steps", "5", "--resume"]) == 0
    assert "resuming at step 3" in capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 5]  # the first session's evaluation kept, the second's added
