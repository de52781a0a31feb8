"""``rnnjax train textclass``: a recurrent text classifier on a user's own files (CSV, TSV or JSON Lines: a
text and a label per example), character or word tokens, batches grouped by length; accuracy and
macro-F1 on the test file, against always answering the most frequent training label."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rnnjax import data, engine, metrics, models
from rnnjax.recipes import classify, common, textfiles
from rnnjax.recipes.flags import Flag, positive

DEFAULTS = {**textfiles.DEFAULTS, "text_column": "text", "label_column": "label", "tokens": "word", "lowercase": True,
            "max_length": None, "pooling": "mean"}


def _examples(plan) -> dict:
    """The token ids and label ids of the fitting, validation and test parts, and the vocabulary and labels."""
    s = plan.settings
    train, test = textfiles.read(data.read_labelled, plan, s["text_column"], s["label_column"])
    labels = textfiles.label_set(plan, train["labels"])
    y = textfiles.encode_labels(labels, train["labels"], train["lines"], s["train"], plan, "label")
    y_test = textfiles.encode_labels(labels, test["labels"], test["lines"], s["test"], plan, "label")
    tokens = [data.tokenize(t, s["tokens"], lowercase=s["lowercase"]) for t in train["texts"]]
    test_tokens = [data.tokenize(t, s["tokens"], lowercase=s["lowercase"]) for t in test["texts"]]
    kept, held = textfiles.split(plan, len(y), labels=y)
    vocab = textfiles.vocabulary(plan, [tokens[i] for i in kept], s["min_count"])
    cut = s["max_length"]

    def ids(seqs):
        return [vocab.lookup(t[:cut], data.labelled.UNK) for t in seqs]

    x = ids(tokens)
    return {"fit": ([x[i] for i in kept], y[kept]), "val": ([x[i] for i in held], y[held]),
            "test": (ids(test_tokens), y_test), "vocab": vocab, "labels": labels,
            "config": textfiles.run_config(vocab, labels, train)}


def _scorer(model):
    @jax.jit
    def per_example(params, batch):
        logits = model.apply(params, batch["x"], lengths=batch["lengths"])
        return {"loss": common.nll(logits, batch["y"]), "pred": jnp.argmax(logits, -1), "y": batch["y"]}

    def score(params, groups) -> dict:
        outs = textfiles.outputs(per_example, groups, params)
        r = {k: np.concatenate([o[k] for o in outs]) for k in ("loss", "pred", "y")}
        return {"loss": float(np.mean(r["loss"])), "accuracy": float(np.mean(r["pred"] == r["y"])),
                "macro_f1": metrics.macro_f1(r["y"].tolist(), r["pred"].tolist()), "pred": r["pred"], "y": r["y"]}

    return score


def _finisher(model, score, test_groups, majority: int, names, title: str):
    def finish(params, history, plot_dir):
        t = score(params, test_groups)
        if plot_dir is not None:
            classify.plot_confusion(t["y"], t["pred"], names, Path(plot_dir) / "confusion.png",
                                    f"{title}: test accuracy {t['accuracy']:.2%}, macro-F1 {t['macro_f1']:.3f}")
        always = np.full_like(t["y"], majority)
        return {"test_accuracy": t["accuracy"], "test_macro_f1": t["macro_f1"], "test_loss": t["loss"],
                "majority_accuracy": float(np.mean(always == t["y"])),
                "majority_macro_f1": metrics.macro_f1(t["y"].tolist(), always.tolist()), "test_examples": len(t["y"])}

    return finish


def prepare(plan: engine.Plan) -> engine.Job:
    s, cmd = plan.settings, plan.cmd
    ex = _examples(plan)
    (x_fit, y_fit), (x_val, y_val), (x_test, y_test) = ex["fit"], ex["val"], ex["test"]
    names, C = ex["labels"].symbols, ex["labels"].size
    model = common.model_or_usage(cmd, lambda: models.classifier(
        C, vocab_size=ex["vocab"].size, embed=s["embed"], cell=s["cell"], layers=s["layers"], hidden=s["hidden"],
        bidirectional=s["bidirectional"], pooling=s["pooling"], dropout=s["dropout"]))

    def loss_fn(params, batch, key):
        return jnp.mean(common.nll(model.apply(params, batch["x"], lengths=batch["lengths"], key=key), batch["y"]))

    score = _scorer(model)
    val_groups = data.pad_groups({"x": x_val}, {"y": y_val})

    def evaluate(params):
        v = score(params, val_groups)
        return {"val_loss": v["loss"], "val_accuracy": v["accuracy"], "val_macro_f1": v["macro_f1"]}

    majority = int(np.argmax(np.bincount(y_fit)))  # ties: the smaller id
    lengths = [len(t) for t in x_fit]
    return engine.Job(
        model_name=model.name, after=common.print_test_metrics, init=model.init, loss_fn=loss_fn,
        batches=textfiles.batches(plan, {"x": x_fit}, {"y": y_fit}), evaluate=evaluate,
        finish=_finisher(model, score, data.pad_groups({"x": x_test}, {"y": y_test}), majority, names,
                         f"{model.name} on {Path(s['test']).name}"),
        describe=f"{Path(s['train']).name}: {len(y_fit)} train / {len(y_val)} validation / {len(y_test)} test texts, "
                 f"{s['tokens']} tokens, {textfiles.describe_vocab(ex['vocab'], s['min_count'])}, "
                 f"{textfiles.lengths_text(lengths)}, {C} labels; batch {s['batch']} grouped by length (padded "
                 "within a group, masked by lengths)",
        metric_unit="nats", files=("metrics.jsonl", "loss.png", "confusion.png"), config=ex["config"],
        meta=ex["config"], tokens_per_step=s["batch"], plot_title=f"{model.name}: {cmd}")


RECIPE = common.task_recipe(
    "textclass", "text classification from your CSV/TSV/JSONL files",
    "Train a recurrent text classifier on your own files: --train and --test, each a .csv or .tsv with a header "
    "row, or a .jsonl with one object per line, holding a text and a label per example. The text is read as "
    "--tokens word or char; the vocabulary is the training part's tokens seen at least --min-count times (the rest "
    "read as <unk>). Batches are grouped by length and masked by it; the encoder's outputs are pooled over each "
    "text's tokens (--pooling). A stratified --val-fraction of the training file validates and picks the best "
    "checkpoint; the test file is scored once, at the end: accuracy and macro-F1, against always answering the "
    "most frequent training label. A test label the training file lacks is an error.",
    defaults=DEFAULTS, steps=1000, prepare=prepare,
    task_flags=(*textfiles.file_flags("a .csv, .tsv or .jsonl file with a text and a label per example"),
                Flag("text_column", str, "the column (or JSON key) of the texts", "task"),
                Flag("label_column", str, "the column (or JSON key) of the labels", "task"),
                Flag("tokens", str, "read texts as word or char tokens", "task", choices=data.labelled.TOKENS),
                Flag("lowercase", "bool", "lowercase the texts first", "task"),
                Flag("max_length", positive(int), "keep only the first N tokens of each text (default: all)", "task")),
    model=("cell", "layers", "hidden", "embed", "bidirectional", "dropout", "pooling"),
)._replace(adjust=textfiles.adjust, same=textfiles.same)
