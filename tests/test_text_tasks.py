"""rnnjax train textclass|tag on small generated files, their metrics against hand computations and
scikit-learn, and the errors for malformed files, word for word."""

import csv
import json

import jax
import numpy as np
import pytest

from rnnjax import checkpoint, cli, data, metrics, models

FILLER = "the a movie plot actor scene was it this and of story".split()
CUES = {"pos": ["great", "loved"], "neg": ["awful", "hated"], "mixed": ["okay", "fine"]}
PEOPLE, CITIES, THINGS = ["alice", "bob", "carol", "dave"], [["paris"], ["new", "york"], ["rome"]], ["car", "house"]


def _reviews(rng, n):
    """Texts whose label is decided by the one cue word they hold, among filler words."""
    rows = []
    for i in range(n):
        label = ("pos", "neg", "mixed")[i % 3]
        words = list(rng.choice(FILLER, int(rng.integers(1, 6))))
        words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(CUES[label])))
        rows.append((" ".join(words).capitalize() + ".", label))
    return rows


def _write_csv(path, rows, header=("review", "sentiment")):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def _sentence(rng):
    """Tokens and BIO tags: people (PER), cities (LOC; "new york" is B-LOC I-LOC while "new" before a car
    or house is O) and filler."""
    person = [(str(rng.choice(PEOPLE)), "B-PER")]
    city = [(w, ("B-LOC", "I-LOC")[k]) for k, w in enumerate(CITIES[int(rng.integers(len(CITIES)))])]
    thing = [("new", "O"), (str(rng.choice(THINGS)), "O")]
    parts = [person, [("visited", "O")], city] if rng.random() < 0.5 else \
        [person, [("sold", "O"), ("the", "O")], thing, [("in", "O")], city]
    return [pair for part in parts for pair in part]


def _write_conll(path, sentences, header=""):
    path.write_text(header + "\n\n".join("\n".join(f"{w} {t}" for w, t in s) for s in sentences) + "\n")
    return path


def _best_outputs(out, model, sequences):
    """The run's best-checkpoint outputs for token-id ``sequences`` (of the vocabulary in its config), all in one
    batch padded to the longest, masked by the lengths; and the checkpoint's step."""
    vocab = json.loads((out / "config.json").read_text())["vocab"]
    ids = {t: i + len(vocab["specials"]) for i, t in enumerate(vocab["symbols"])}
    lengths = np.array([len(seq) for seq in sequences])
    x = np.zeros((len(sequences), lengths.max()), np.int32)
    for row, seq in zip(x, sequences):
        row[:len(seq)] = [ids.get(t, data.labelled.UNK) for t in seq]
    ckpt, step = checkpoint.open_run(out, which="best")
    params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
    ckpt.close()
    return np.asarray(jax.jit(model.apply)(params, x, lengths=lengths)), step


def _train(task, files, *flags):
    return cli.main(["train", task, "--train", str(files[0]), "--test", str(files[1]), "--no-plot",
                     "--hidden", "16", "--embed", "16", "--lr", "2e-2", *flags])


def test_textclass_learns_cue_words_and_eval_reproduces_its_metrics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train, test = _reviews(rng, 150), _reviews(rng, 60)
    files = (_write_csv(tmp_path / "train.csv", train), _write_csv(tmp_path / "test.csv", test))
    out = tmp_path / "run"
    assert _train("textclass", files, "--text-column", "review", "--label-column", "sentiment", "--steps", "60",
                  "--evals", "2", "--batch", "16", "--no-bidirectional", "--out", str(out)) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["test_accuracy"] >= 0.9 and m["test_macro_f1"] >= 0.9 and m["test_examples"] == 60
    # Always "mixed" (the most frequent training label; ties: the smallest id): right on a third, F1 2/4
    # for that class and 0 for the others.
    assert m["majority_accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    assert m["majority_macro_f1"] == pytest.approx(1 / 6, abs=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == ["mixed", "neg", "pos"] and config["vocab"]["specials"] == ["<pad>", "<unk>"]
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in m} == m
    # Independently: the best checkpoint's answers for the test texts, all in one batch (not in length groups),
    # right on the reported fraction, with the reported macro-F1 (metrics.macro_f1: scikit-learn's, below).
    model = models.classifier(3, vocab_size=len(config["vocab"]["symbols"]) + 2, embed=16, hidden=16,
                              pooling="mean")
    logits, step = _best_outputs(out, model, [data.tokenize(t, lowercase=True) for t, _ in test])
    pred, y = np.argmax(logits, -1), np.array([config["labels"].index(label) for _, label in test])
    assert step == json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert abs(np.mean(pred == y) - m["test_accuracy"]) < 1e-6
    assert abs(metrics.macro_f1(y.tolist(), pred.tolist()) - m["test_macro_f1"]) < 1e-6


def test_tag_learns_entities_in_context_and_eval_reproduces_its_metrics(tmp_path, capsys):
    rng = np.random.default_rng(1)
    header = "-DOCSTART- O\n\n# sent_id = 1\n"
    train, test = [_sentence(rng) for _ in range(120)], [_sentence(rng) for _ in range(40)]
    files = (_write_conll(tmp_path / "train.conll", train, header), _write_conll(tmp_path / "test.conll", test))
    out = tmp_path / "run"
    assert _train("tag", files, "--steps", "60", "--evals", "1", "--out", str(out)) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["test_accuracy"] >= 0.98 and m["test_entity_f1"] >= 0.95 and m["test_sentences"] == 40
    # Most frequent tag per token: "new" is O more often than B-LOC, so every "new york" is missed.
    assert m["frequent_tag_entity_f1"] < m["test_entity_f1"]
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: again[k] for k in m} == m
    # Independently: the best checkpoint's tags for the test sentences, all in one batch (not in length groups):
    # the reported per-token accuracy, and the reported entity F1 (metrics.span_f1, checked by hand below).
    config = json.loads((out / "config.json").read_text())
    tags = config["labels"]
    model = models.tagger(len(tags), vocab_size=len(config["vocab"]["symbols"]) + 2, embed=16, hidden=16,
                          bidirectional=True)
    logits, _ = _best_outputs(out, model, [[w for w, _ in sent] for sent in test])
    pred = [[tags[i] for i in np.argmax(row[:len(sent)], -1)] for row, sent in zip(logits, test)]
    true = [[t for _, t in sent] for sent in test]
    assert abs(np.mean(np.concatenate(pred) == np.concatenate(true)) - m["test_accuracy"]) < 1e-6
    assert abs(metrics.span_f1(true, pred)["f1"] - m["test_entity_f1"]) < 1e-6


def test_bio_spans_and_span_f1_against_a_hand_count():
    assert metrics.bio_spans(["B-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == [
        ("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 5), ("ORG", 5, 6)]
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-PER"]]
    # Spans: true PER(0,2) LOC(3,4) | ORG(0,1) PER(2,3); predicted PER(0,2) ORG(3,4) | ORG(0,1) PER(2,3).
    # 3 of 4 predicted are right, 3 of 4 true are found: precision = recall = F1 = 0.75.
    assert metrics.span_f1(true, pred) == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "true_entities": 4,
                                           "predicted_entities": 4, "correct_entities": 3}
    # A split entity: PER(0,1) and PER(1,2) against PER(0,2): nothing right; precision 0/2, recall 0/1.
    assert metrics.span_f1([["B-PER", "I-PER"]], [["B-PER", "B-PER"]])["f1"] == 0.0
    assert metrics.is_bio(["O", "B-PER", "I-PER"]) and not metrics.is_bio(["NN", "VB"]) and not metrics.is_bio(["O"])


def test_macro_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 4, 50).tolist(), rng.integers(0, 5, 50).tolist()
    assert metrics.macro_f1(y, p) == pytest.approx(f1_score(y, p, average="macro"), abs=1e-12)


def test_length_batches_group_by_length_and_resume():
    rng = np.random.default_rng(0)
    seqs = [np.arange(1, n + 1) for n in rng.integers(1, 40, 30)]
    groups = data.pad_groups({"x": seqs}, {"i": np.arange(30)}, batch_size=4)
    for g in groups:  # each example once, padded to a power of two that holds it, its own tokens kept
        for row, i, n in zip(g["x"], g["i"], g["lengths"]):
            assert np.array_equal(row[:n], seqs[i]) and not row[n:].any() and len(seqs[i]) == n
        assert len(g["i"]) >= 4 and g["x"].shape[1] in (8, 16, 32, 64)
    assert sorted(np.concatenate([g["i"] for g in groups]).tolist()) == list(range(30))
    batches = data.LengthBatches({"x": seqs}, {"i": np.arange(30)}, 4, seed=3)
    first = [next(batches) for _ in range(9)]
    batches.position = 7
    again = [next(batches) for _ in range(2)]
    assert all(np.array_equal(b[k], first[7 + j][k]) for j, b in enumerate(again) for k in ("x", "i"))
    epoch = np.concatenate([b["i"] for b in first[:batches.per_epoch]])
    assert len(set(epoch.tolist())) == len(epoch)  # an epoch reads no example twice


def _error(capsys, task, files, *flags):
    assert _train(task, files, "--steps", "1", *flags) == 2
    return capsys.readouterr().err


def test_malformed_text_files_are_named_with_their_line(tmp_path, capsys):
    good = _write_csv(tmp_path / "ok.csv", [("fine film", "pos"), ("bad film", "neg")], ("text", "label"))
    bad = _write_csv(tmp_path / "cols.csv", [("fine film", "pos")], ("review", "label"))
    err = _error(capsys, "textclass", (bad, good), "--out", str(tmp_path / "a"))
    assert err == (f"rnnjax: error: rnnjax train textclass: rnnjax.data.read_labelled: {str(bad)!r}, line 1: no column "
                   "'text'; the header names 'review', 'label'. Fix: name the text and label columns among those "
                   "(--text-column, --label-column).\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _error(capsys, "textclass", (good, empty), "--out", str(tmp_path / "a"))
    assert err == (f"rnnjax: error: rnnjax train textclass: rnnjax.data.read_labelled: {str(empty)!r} is empty; "
                   "expected one JSON object per line. Fix: pass a file that holds them.\n")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "fine", "label": "pos"}\n\n{"text": "so so"}\n')
    err = _error(capsys, "textclass", (good, jsonl), "--out", str(tmp_path / "a"))
    assert err == (f"rnnjax: error: rnnjax train textclass: rnnjax.data.read_labelled: {str(jsonl)!r}, line 3: no key "
                   "'label'; the object has 'text'. Fix: name the text and label keys among those (--text-column, "
                   "--label-column).\n")
    unseen = _write_csv(tmp_path / "unseen.csv", [("fine", "pos"), ("meh", "neutral")], ("text", "label"))
    err = _error(capsys, "textclass", (good, unseen), "--out", str(tmp_path / "a"))
    assert err == (f"rnnjax: error: rnnjax train textclass: {str(unseen)!r}, line 3: the label 'neutral' is not among "
                   "the 2 labels of the training file (neg, pos); a model cannot predict a label it never saw. Fix: "
                   "correct it, or add examples of it to the training file.\n")
    assert not (tmp_path / "a").exists()


def test_malformed_conll_files_are_named_with_their_line(tmp_path, capsys):
    good = _write_conll(tmp_path / "ok.conll", [[("alice", "B-PER"), ("ran", "O")], [("bob", "B-PER")]])
    for name, line in (("three", "ran O extra"), ("one", "ran")):
        path = tmp_path / f"{name}.conll"
        path.write_text(f"alice B-PER\n{line}\n")
        err = _error(capsys, "tag", (path, good), "--out", str(tmp_path / "a"))
        assert err == (f"rnnjax: error: rnnjax train tag: rnnjax.data.read_conll: {str(path)!r}, line 2: expected 2 "
                       f"whitespace-separated fields as on line 1 (the token first, the tag last), got "
                       f"{len(line.split())}: {line!r}. Fix: write one token (without spaces) and its tag per line, a "
                       "blank line between sentences.\n")
    blank = tmp_path / "blank.conll"
    blank.write_text("\n\n")
    err = _error(capsys, "tag", (good, blank), "--out", str(tmp_path / "a"))
    assert err == (f"rnnjax: error: rnnjax train tag: rnnjax.data.read_conll: {str(blank)!r} is empty; expected one "
                   "token and its tag per line, a blank line between sentences. Fix: pass a file that holds them.\n")
    unseen = _write_conll(tmp_path / "unseen.conll", [[("bob", "B-PER")], [("rome", "B-LOC")]])
    err = _error(capsys, "tag", (good, unseen), "--out", str(tmp_path / "a"))
    assert err == (f"rnnjax: error: rnnjax train tag: {str(unseen)!r}, line 3: the tag 'B-LOC' is not among the 2 "
                   "tags of the training file (B-PER, O); a model cannot predict a tag it never saw. Fix: correct it, "
                   "or add examples of it to the training file.\n")
    assert not (tmp_path / "a").exists()
