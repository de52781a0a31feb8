"""Labelled text from a user's own files: texts with one label each (CSV, TSV or JSON Lines), sentences
tagged token by token (CoNLL), their tokens and vocabulary, and batches grouped by length.

::

    d = read_labelled("reviews.csv", text_column="review", label_column="stars")   # {"texts", "labels", "lines"}
    c = read_conll("train.conll")                                  # {"tokens", "tags", "lines"}: lists per sentence
    toks = [tokenize(t, "word") for t in d["texts"]]
    vocab = token_vocabulary(toks, min_count=2)                   # ids: 0 <pad>, 1 <unk>, then by frequency
    ids = [vocab.lookup(t, UNK) for t in toks]

Every error names the file and the line (1-based, as an editor counts them) and says how to fix it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from pathlib import Path

from rnnjax.data.g2p import Symbols
from rnnjax.data.text import read_text

TOKENS = ("char", "word")
PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None}
WORD = re.compile(r"\w+|[^\w\s]")  # runs of letters/digits, and each other non-space character alone


def _read(fn: str, path, what: str) -> str:
    """The text of ``path``; an empty or whitespace-only file is an error saying what it should hold."""
    p = Path(path).expanduser()
    if p.is_file() and not p.read_bytes().strip():
        raise ValueError(f"{fn}: {str(path)!r} is empty; expected {what}. Fix: pass a file that holds them.")
    return read_text(path)


def read_labelled(path: str | os.PathLike, text_column: str = "text", label_column: str = "label") -> dict:
    """Texts and their labels, one example per row: ``{"texts", "labels", "lines"}`` (labels as strings,
    ``lines`` the line each example starts on).

    By the file's extension: ``.csv`` or ``.tsv`` (a header row naming the columns; quoted fields may
    span lines) or ``.jsonl`` (one JSON object per line, with the two keys; a number as label becomes
    its text). Blank lines are skipped. A missing column or key, a row with the wrong number of fields,
    an empty text or label, or a file without examples is a ValueError naming the file and line.
    """
    fn = "rnnjax.data.read_labelled"
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{fn}: cannot tell the format of {str(path)!r} from its extension {suffix or '(none)'!r}; "
                         "expected .csv, .tsv or .jsonl. Fix: rename the file to the extension of its format.")
    what = ("one JSON object per line" if suffix == ".jsonl" else "a header row and one example per row")
    text = _read(fn, path, what)
    where = f"{fn}: {str(path)!r}"
    rows = _jsonl_rows(where, text, text_column, label_column) if suffix == ".jsonl" else \
        _csv_rows(where, text, SUFFIXES[suffix], text_column, label_column)
    out = {"texts": [], "labels": [], "lines": []}
    for line, body, label in rows:
        for name, value in (("text", body), ("label", label)):
            if not value.strip():
                raise ValueError(f"{where}, line {line}: the {name} is empty; expected every example to have a "
                                 f"text and a label. Fix: fill it in or delete the line.")
        out["texts"].append(body)
        out["labels"].append(label.strip())
        out["lines"].append(line)
    if not out["texts"]:
        raise ValueError(f"{where} has no examples, only {'a header' if suffix != '.jsonl' else 'blank lines'}; "
                         f"expected {what}. Fix: pass a file with examples.")
    return out


def _csv_rows(where: str, text: str, delimiter: str, text_column: str, label_column: str):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in next(reader)]
    for column in (text_column, label_column):
        if column not in header:
            raise ValueError(f"{where}, line 1: no column {column!r}; the header names {', '.join(map(repr, header))}. "
                             "Fix: name the text and label columns among those (--text-column, --label-column).")
    t, lab = header.index(text_column), header.index(label_column)
    start = reader.line_num + 1
    for row in reader:
        if row:
            if len(row) != len(header):
                raise ValueError(f"{where}, line {start}: expected {len(header)} fields as the header has, got "
                                 f"{len(row)}. Fix: quote fields that contain the delimiter {delimiter!r} or line "
                                 "breaks (\"like, this\").")
            yield start, row[t], row[lab]
        start = reader.line_num + 1


def _jsonl_rows(where: str, text: str, text_column: str, label_column: str):
    for line, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}, line {line}: not valid JSON ({e.msg}, column {e.colno}). Fix: write one "
                             "JSON object per line.") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}, line {line}: expected a JSON object, got {type(obj).__name__}. Fix: write "
                             'one object per line, e.g. {"text": "...", "label": "..."}.')
        for key in (text_column, label_column):
            if key not in obj:
                raise ValueError(f"{where}, line {line}: no key {key!r}; the object has {', '.join(map(repr, obj))}. "
                                 "Fix: name the text and label keys among those (--text-column, --label-column).")
            if not isinstance(obj[key], (str, int)) or isinstance(obj[key], bool):
                raise ValueError(f"{where}, line {line}: the value of {key!r} is {type(obj[key]).__name__}; expected "
                                 "a string (or a whole number as label). Fix: write it as a string.")
        yield line, str(obj[text_column]), str(obj[label_column])


def read_conll(path: str | os.PathLike) -> dict:
    """Sentences tagged token by token: ``{"tokens", "tags", "lines"}``, one list per sentence (``lines``:
    each token's line).

    One token per line, its fields separated by whitespace: the token first, its tag last (fields in
    between, such as CoNLL-2003's part-of-speech and chunk columns, are ignored); every token line has
    as many fields as the first. A blank line ends a sentence. A line whose first field is
    ``-DOCSTART-`` (a CoNLL-2003 document boundary) ends the sentence and is skipped; so is a comment
    line, one whose first field is ``#``, before a sentence's first token (CoNLL-U's ``# text = ...``);
    elsewhere ``#`` is a token. A line with another number of fields is a ValueError naming it.
    """
    fn = "rnnjax.data.read_conll"
    text = _read(fn, path, "one token and its tag per line, a blank line between sentences")
    out = {"tokens": [], "tags": [], "lines": []}
    sentence, fields, first = ([], [], []), None, None
    for line, raw in enumerate([*text.split("\n"), ""], 1):
        parts = raw.split()
        if not parts or parts[0] == "-DOCSTART-" or (parts[0] == "#" and not sentence[0]):
            if sentence[0]:
                for key, value in zip(out, sentence):
                    out[key].append(value)
                sentence = ([], [], [])
            continue
        if fields is None:
            if len(parts) < 2:
                raise ValueError(f"{fn}: {str(path)!r}, line {line}: expected a token and its tag separated by "
                                 f"whitespace, got one field {raw.strip()!r}. Fix: add the tag after the token.")
            fields, first = len(parts), line
        elif len(parts) != fields:
            raise ValueError(f"{fn}: {str(path)!r}, line {line}: expected {fields} whitespace-separated fields as on "
                             f"line {first} (the token first, the tag last), got {len(parts)}: {raw.strip()!r}. Fix: "
                             "write one token (without spaces) and its tag per line, a blank line between sentences.")
        for part, value in zip(sentence, (parts[0], parts[-1], line)):
            part.append(value)
    if not out["tokens"]:
        raise ValueError(f"{fn}: {str(path)!r} has no tokens, only comments or document markers; expected one "
                         "token and its tag per line. Fix: pass a file with tagged sentences.")
    return out


def tokenize(text: str, tokens: str = "word", *, lowercase: bool = False) -> list[str]:
    """The tokens of ``text``: ``"char"``, every character (spaces included); ``"word"``, runs of letters and
    digits, and each other non-space character on its own (``"Don't!"`` -> ``Don ' t !``)."""
    if tokens not in TOKENS:
        raise ValueError(f"rnnjax.data.tokenize: unknown tokens {tokens!r}; expected one of {', '.join(TOKENS)}.")
    text = text.lower() if lowercase else text
    return list(text) if tokens == "char" else WORD.findall(text)


def token_vocabulary(sequences, min_count: int = 1) -> Symbols:
    """The tokens seen at least ``min_count`` times in ``sequences``, most frequent first (ties in code point
    order), after the ids :data:`PAD` and :data:`UNK`: ``vocab.lookup(tokens, UNK)`` encodes a sequence,
    a rarer or unseen token as ``UNK``."""
    counts = Counter(t for s in sequences for t in s)
    kept = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return Symbols(tuple(kept), SPECIALS, "token(s)")
