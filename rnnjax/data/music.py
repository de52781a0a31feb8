"""Music as piano rolls: scores read with ``music21`` (its bundled corpus, or a folder of a user's
MusicXML, MIDI or Humdrum files; never the network), quantised to a fixed step, and written back
as MIDI.

::

    d = load_chorales()                 # {"rolls": [T_i, 128] uint8 each, "names": [...], "step": 1.0}
    roll = piano_roll(score, step=0.5)  # any music21 score, eighth notes
    write_midi(roll[:, 36:89], 36, "out.mid", step=1.0)

A piano roll has one row per step and one column per MIDI pitch: ``roll[t, p] = 1`` when a note
of pitch ``p`` sounds at the start of step ``t`` (its onset ``<= t * step <`` its end). ``step``
is in quarter notes: 1.0 (a quarter note, the JSB chorales' quantisation) or 0.5 (an eighth).
Shorter notes between two step starts are not seen, and a roll cannot tell a held note from the
same note struck again.

Parsing the ~400 Bach scores takes a minute or more, so :func:`load_chorales` caches the rolls in
``$XDG_CACHE_HOME/rnnjax`` (default ``~/.cache/rnnjax``), one ``.npz`` per music21 version and step.
music21 is imported only here, and read without its own caches: no pickles in its scratch folder,
no environment file, no downloads.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
from pathlib import Path

import numpy as np

from rnnjax.data.datasets import require
from rnnjax.data.text import _cache_dir

VOICES = ("Soprano", "Alto", "Tenor", "Bass")  # the parts of a chorale that make its roll
SUFFIXES = (".mxl", ".musicxml", ".xml", ".mid", ".midi", ".krn")  # what a --data folder is read for
PITCHES = 128  # MIDI pitches: the columns of a roll
_FORMAT = 1  # bump when the rolls change, so stale caches are rebuilt


def _music21(fn: str, what: str = "reading music"):
    return require("music21", fn, what, extra="music")


def _check_step(fn: str, step) -> float:
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step <= 4 or not math.isfinite(step):
        raise ValueError(f"{fn}: step is in quarter notes and must be in (0, 4], got {step!r}. Fix: pass 1.0 (a "
                         "quarter note) or 0.5 (an eighth).")
    return float(step)


def piano_roll(score, step: float = 1.0, *, parts=None) -> np.ndarray:
    """The piano roll ``[T, 128]`` (uint8) of a music21 score (or part): ``T = ceil(length / step)``
    steps, ``roll[t, p] = 1`` where a note (or a chord's note) of MIDI pitch ``p`` sounds at offset
    ``t * step``. ``parts``: the parts to read (default: all of them)."""
    fn = "rnnjax.data.music.piano_roll"
    step = _check_step(fn, step)
    streams = list(parts) if parts is not None else (list(score.parts) or [score])
    T = max(0, math.ceil(float(score.highestTime) / step - 1e-9))
    roll = np.zeros((T, PITCHES), np.uint8)
    for stream in streams:
        flat = stream.flatten()
        for n in flat.getElementsByClass(("Note", "Chord")):
            on = float(flat.elementOffset(n))
            first = math.ceil(on / step - 1e-9)
            last = math.ceil((on + float(n.quarterLength)) / step - 1e-9)  # the first step past its end
            for pitch in n.pitches:
                roll[first:min(last, T), pitch.midi] = 1
    return roll


def read_score(path: str | os.PathLike):
    """A score file parsed by music21 (MusicXML, MIDI, Humdrum, ...) without its pickle cache."""
    converter = _music21("rnnjax.data.music.read_score", f"reading {str(path)!r}").converter
    return converter.parseFile(Path(path), forceSource=True, storePickle=False)


def voices(score):
    """The soprano, alto, tenor and bass parts of a chorale (by part name), or None when one is missing."""
    by_name = {(p.partName or "").strip(): p for p in score.parts}
    found = [by_name.get(v) for v in VOICES]
    return None if any(p is None for p in found) else found


def _unique(rolls: list[np.ndarray], names: list[str]) -> dict:
    """The rolls without exact repeats (the first of each kept)."""
    seen, keep = set(), []
    for i, r in enumerate(rolls):
        key = (r.shape, r.tobytes())
        if len(r) and key not in seen:
            seen.add(key)
            keep.append(i)
    return {"rolls": [rolls[i] for i in keep], "names": [names[i] for i in keep]}


def bach_paths() -> list[Path]:
    """The Bach scores of music21's corpus (MusicXML; its Roman-numeral analyses and Humdrum copies left out)."""
    corpus = _music21("rnnjax.data.music.bach_paths", "the Bach chorales").corpus
    return sorted(p for p in corpus.getComposer("bach") if p.suffix in (".mxl", ".xml"))


def _cache_path(step: float) -> Path:
    version = importlib.metadata.version("music21")
    return _cache_dir() / f"bach-chorales-music21-{version}-step{step:g}-v{_FORMAT}.npz"


def _read_cache(path: Path) -> dict | None:
    try:
        with np.load(path) as z:
            flat, lengths, names = z["flat"], z["lengths"], [str(n) for n in z["names"]]
    except (OSError, ValueError, KeyError):
        return None
    if int(lengths.sum()) != len(flat) or len(names) != len(lengths):
        return None
    return {"rolls": np.split(flat, np.cumsum(lengths)[:-1]), "names": names}


def _write_cache(path: Path, d: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
        np.savez_compressed(tmp, flat=np.concatenate(d["rolls"]), names=np.array(d["names"]),
                            lengths=np.array([len(r) for r in d["rolls"]], np.int64))
        os.replace(tmp, path)  # atomic: concurrent builders never see half a file
    except OSError:
        pass  # a read-only home is no reason to fail; the rolls are parsed again next time


def load_chorales(step: float = 1.0, *, cache: bool = True) -> dict:
    """Bach's chorales from music21's bundled corpus as piano rolls: every Bach score with soprano,
    alto, tenor and bass parts (those four voices only; instrumental parts left out), exact
    repeats dropped. Returns ``{"rolls": [[T_i, 128] uint8], "names": [file names], "step"}``.
    Cached (see the module's docs); ``cache=False`` neither reads nor writes the cache."""
    fn = "rnnjax.data.music.load_chorales"
    step = _check_step(fn, step)
    paths = bach_paths()
    path = _cache_path(step)
    d = _read_cache(path) if cache and path.is_file() else None
    if d is None:
        rolls, names = [], []
        for p in paths:
            score = read_score(p)
            parts = voices(score)
            if parts is not None:
                rolls.append(piano_roll(score, step, parts=parts))
                names.append(p.name)
        d = _unique(rolls, names)
        if cache:
            _write_cache(path, d)
    return {**d, "step": step}


def load_folder(folder: str | os.PathLike, step: float = 1.0) -> dict:
    """Every score file in ``folder`` (not its subfolders; :data:`SUFFIXES`) as a piano roll of all
    its parts, in file-name order, exact repeats and empty scores dropped; as :func:`load_chorales`."""
    fn = "rnnjax.data.music.load_folder"
    step = _check_step(fn, step)
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise ValueError(f"{fn}: expected a folder of score files ({', '.join(SUFFIXES)}), got {str(folder)!r}, "
                         "which is not a folder. Fix: pass the folder that holds them.")
    paths = sorted(p for p in base.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"{fn}: {str(folder)!r} holds no score files; expected files ending in "
                         f"{', '.join(SUFFIXES)}. Fix: put MusicXML or MIDI files there.")
    rolls = [piano_roll(read_score(p), step) for p in paths]
    return {**_unique(rolls, [p.name for p in paths]), "step": step}


def pitch_range(rolls) -> tuple[int, int]:
    """``(lowest, highest)``: the MIDI pitches of the lowest and highest note sounding in ``rolls``."""
    used = np.flatnonzero(np.any([r.any(axis=0) for r in rolls], axis=0))
    if not len(used):
        raise ValueError("rnnjax.data.music.pitch_range: no note sounds in any piece (all rolls are empty). "
                         "Fix: pass scores with notes.")
    return int(used[0]), int(used[-1])


def roll_to_score(roll, lowest: int, step: float = 1.0):
    """A music21 score of one part from a roll ``[T, P]`` whose column ``j`` is MIDI pitch ``lowest + j``:
    each run of consecutive steps a pitch is on becomes one note (a roll has no onsets)."""
    m21 = _music21("rnnjax.data.music.roll_to_score", "writing music")
    step = _check_step("rnnjax.data.music.roll_to_score", step)
    on = np.asarray(roll) > 0
    part = m21.stream.Part()
    part.insert(0, m21.instrument.Piano())
    edges = np.diff(np.pad(on.astype(np.int8), ((1, 1), (0, 0))), axis=0)  # +1 at onsets, -1 past ends
    for j in range(on.shape[1]):
        for a, b in zip(np.flatnonzero(edges[:, j] == 1), np.flatnonzero(edges[:, j] == -1)):
            note = m21.note.Note(lowest + j, quarterLength=float((b - a) * step))
            part.insert(float(a * step), note)
    score = m21.stream.Score()
    score.insert(0, part)
    return score


def write_midi(roll, lowest: int, path: str | os.PathLike, step: float = 1.0) -> Path:
    """Writes :func:`roll_to_score` of ``roll`` as a MIDI file (music21's writer); returns the path."""
    translate = require("music21.midi.translate", "rnnjax.data.music.write_midi", "writing MIDI", extra="music")
    mf = translate.streamToMidiFile(roll_to_score(roll, lowest, step))
    out = Path(path)
    mf.open(str(out), "wb")
    try:
        mf.write()
    finally:
        mf.close()
    return out
