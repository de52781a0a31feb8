"""``rnnjax train tag``: a bidirectional recurrent tagger (part of speech, named entities, ...) on a user's
CoNLL files; per-token accuracy and, where the tags are BIO, exact-span entity F1, against tagging each
token with its most frequent training tag."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, metrics, models
from rnnjax.recipes import common, textfiles
from rnnjax.recipes.flags import Flag

DEFAULTS = {**textfiles.DEFAULTS, "lowercase": False, "batch": 16}


def _sentences(plan) -> dict:
    """Token ids and tag ids of the fitting, validation and test sentences, and the vocabulary and tags."""
    s = plan.settings
    train, test = textfiles.read(data.read_conll, plan)
    tags = textfiles.label_set(plan, [t for sent in train["tags"] for t in sent])

    def tag_ids(d, path):
        flat = textfiles.encode_labels(tags, [t for sent in d["tags"] for t in sent],
                                       [n for sent in d["lines"] for n in sent], path, plan, "tag")
        return np.split(flat, np.cumsum([len(sent) for sent in d["tags"]])[:-1])

    y, y_test = tag_ids(train, s["train"]), tag_ids(test, s["test"])
    low = (lambda t: t.lower()) if s["lowercase"] else (lambda t: t)
    words = [[low(t) for t in sent] for sent in train["tokens"]]
    test_words = [[low(t) for t in sent] for sent in test["tokens"]]
    kept, held = textfiles.split(plan, len(words))
    vocab = textfiles.vocabulary(plan, [words[i] for i in kept], s["min_count"])
    x = [vocab.lookup(sent, data.labelled.UNK) for sent in words]
    return {"fit": ([x[i] for i in kept], [y[i] for i in kept]), "val": ([x[i] for i in held], [y[i] for i in held]),
            "test": ([vocab.lookup(sent, data.labelled.UNK) for sent in test_words], y_test), "vocab": vocab,
            "tags": tags, "fit_words": [words[i] for i in kept], "test_words": test_words,
            "config": textfiles.run_config(vocab, tags, train)}


def _valid(batch):
    return jnp.arange(batch["x"].shape[-1]) < batch["lengths"][:, None]


def _scores(pred: list, true: list, names, bio: bool) -> dict:
    """Per-token accuracy and, for BIO tags, entity precision, recall and F1 of per-sentence tag ids."""
    flat_p, flat_t = np.concatenate(pred), np.concatenate(true)
    r = {"accuracy": float(np.mean(flat_p == flat_t))}
    if bio:
        spans = metrics.span_f1([[names[i] for i in t] for t in true], [[names[i] for i in p] for p in pred])
        r.update({f"entity_{k}": spans[k] for k in ("f1", "precision", "recall")})
    return r


def _scorer(model, names, bio: bool):
    @jax.jit
    def per_sentence(params, batch):
        logits = model.apply(params, batch["x"], lengths=batch["lengths"])
        loss = jnp.where(_valid(batch), common.nll(logits, batch["y"]), 0.0).sum(-1)
        return {"loss": loss, "pred": jnp.argmax(logits, -1), "y": batch["y"], "lengths": batch["lengths"]}

    def score(params, groups) -> dict:
        pred, true, loss = [], [], 0.0
        for o in textfiles.outputs(per_sentence, groups, params):
            pred += [p[:n] for p, n in zip(o["pred"], o["lengths"])]
            true += [t[:n] for t, n in zip(o["y"], o["lengths"])]
            loss += float(o["loss"].sum())
        return {"loss": loss / sum(len(t) for t in true), **_scores(pred, true, names, bio)}

    return score


def frequent_tags(words: list, tags: list, test_words: list) -> list:
    """The baseline: each test token's most frequent tag among its occurrences in ``words`` (ties: the
    smaller tag id), an unseen token's the most frequent tag of all."""
    counts: dict = {}
    for sent_w, sent_t in zip(words, tags):
        for w, t in zip(sent_w, sent_t.tolist()):
            counts.setdefault(w, Counter())[t] += 1
    overall = Counter(t for sent in tags for t in sent.tolist())
    best = {w: min(c, key=lambda t: (-c[t], t)) for w, c in counts.items()}
    fallback = min(overall, key=lambda t: (-overall[t], t))
    return [np.array([best.get(w, fallback) for w in sent], np.int32) for sent in test_words]


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    ex = _sentences(plan)
    (x_fit, y_fit), (x_val, y_val), (x_test, y_test) = ex["fit"], ex["val"], ex["test"]
    names = ex["tags"].symbols
    bio = metrics.is_bio(names)
    model = common.model_or_usage(cmd, lambda: models.tagger(
        len(names), vocab_size=ex["vocab"].size, embed=s["embed"], cell=s["cell"], layers=s["layers"],
        hidden=s["hidden"], bidirectional=s["bidirectional"], dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        valid = _valid(batch)
        nll = common.nll(model.apply(params, batch["x"], lengths=batch["lengths"], key=key), batch["y"])
        return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)

    score = _scorer(model, names, bio)
    val_groups = data.pad_groups({"x": x_val, "y": y_val}, {})

    def evaluate(params):
        return {f"val_{k}": v for k, v in score(params, val_groups).items()}

    test_groups = data.pad_groups({"x": x_test, "y": y_test}, {})
    base = _scores(frequent_tags(ex["fit_words"], y_fit, ex["test_words"]), y_test, names, bio)

    def finish(params, history, plot_dir):
        return {**{f"test_{k}": v for k, v in score(params, test_groups).items()},
                **{f"frequent_tag_{k}": v for k, v in base.items()},
                "test_sentences": len(y_test), "test_tokens": sum(len(t) for t in y_test)}

    scheme = "BIO tags: entity F1 reported" if bio else "tags not BIO: no entity F1"
    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=model.init, loss_fn=loss_fn,
        batches=textfiles.batches(plan, {"x": x_fit, "y": y_fit}, {}), evaluate=evaluate, finish=finish,
        describe=f"{Path(s['train']).name}: {len(y_fit)} train / {len(y_val)} validation / {len(y_test)} test "
                 f"sentences, {textfiles.describe_vocab(ex['vocab'], s['min_count'])}, "
                 f"{textfiles.lengths_text([len(t) for t in x_fit])}, {len(names)} tags ({scheme}); batch "
                 f"{s['batch']} sentences grouped by length (padded within a group, masked by lengths)",
        metric_unit="nats/token", config=ex["config"], meta=ex["config"], tokens_per_step=s["batch"],
        plot_title=f"{model.name}: {cmd}")


RECIPE = common.task_recipe(
    "tag", "sequence tagging (POS, NER) from your CoNLL files",
    "Train a bidirectional recurrent tagger on your own CoNLL files: --train and --test, one token and its tag per "
    "line (whitespace-separated: the token first, the tag last), a blank line between sentences; -DOCSTART- lines "
    "and # comment lines before a sentence are skipped. The vocabulary is the training part's tokens seen at least "
    "--min-count times (the rest read as <unk>). Batches of sentences are grouped by length and masked by it. A "
    "--val-fraction of the training sentences validates and picks the best checkpoint; the test file is scored once, "
    "at the end: per-token accuracy and, when every tag is O, B-TYPE or I-TYPE, exact-span entity precision, recall "
    "and F1 (as conlleval), against tagging each token with its most frequent training tag. A test tag the training "
    "file lacks is an error.",
    defaults=DEFAULTS, steps=1000, prepare=prepare,
    task_flags=(*textfiles.file_flags("one token and its tag per line, a blank line between sentences"),
                Flag("lowercase", "bool", "lowercase the tokens first", "task")),
    model=("cell", "layers", "hidden", "embed", "bidirectional", "dropout"),
)._replace(adjust=textfiles.adjust, same=textfiles.same)
