"""rnnjax train music: piano-roll quantisation, the baselines, and a tiny run end to end (train, eval,
generate, the MIDI read back)."""

import json
import math
import shutil

import jax
import numpy as np
import pytest

from rnnjax import checkpoint, cli
from rnnjax.data import music
from rnnjax.recipes import music as recipe

music21 = pytest.importorskip("music21")
CHORALES = ("bwv286.mxl", "bwv165.6.mxl", "bwv255.mxl", "bwv265.mxl", "bwv274.mxl")  # short ones


def _score():
    """Two parts: C4 (1 beat), E4 (half a beat), G4 (half a beat, off the beat), a rest, the chord C4+E4
    (2 beats); under it C3 (4 beats) and D3 (1 beat)."""
    m21 = music21
    upper, lower = m21.stream.Part(), m21.stream.Part()
    for n in (m21.note.Note(60, quarterLength=1), m21.note.Note(64, quarterLength=0.5),
              m21.note.Note(67, quarterLength=0.5), m21.note.Rest(quarterLength=1),
              m21.chord.Chord([60, 64], quarterLength=2)):
        upper.append(n)
    lower.append(m21.note.Note(48, quarterLength=4))
    lower.append(m21.note.Note(50, quarterLength=1))
    score = m21.stream.Score()
    score.insert(0, upper)
    score.insert(0, lower)
    return score


def _sounding(roll):
    return [sorted(np.flatnonzero(row).tolist()) for row in roll]


def test_piano_roll_of_a_hand_written_score_at_quarters_and_eighths():
    score = _score()
    quarters = music.piano_roll(score, 1.0)
    assert quarters.shape == (5, 128)
    assert _sounding(quarters) == [[48, 60], [48, 64], [48], [48, 60, 64], [50, 60, 64]]  # G4 falls between
    eighths = music.piano_roll(score, 0.5)
    assert _sounding(eighths) == [[48, 60], [48, 60], [48, 64], [48, 67], [48], [48], [48, 60, 64], [48, 60, 64],
                                  [50, 60, 64], [50, 60, 64]]
    assert _sounding(music.piano_roll(score, 1.0, parts=[score.parts[1]])) == [[48]] * 4 + [[50]]
    assert music.pitch_range([quarters, eighths]) == (48, 67)


def test_step_and_folder_errors_say_what_to_pass(tmp_path):
    with pytest.raises(ValueError) as e:
        music.piano_roll(_score(), 0)
    assert str(e.value) == ("rnnjax.data.music.piano_roll: step is in quarter notes and must be in (0, 4], got 0. "
                            "Fix: pass 1.0 (a quarter note) or 0.5 (an eighth).")
    (tmp_path / "notes.txt").write_text("C D E")
    with pytest.raises(ValueError) as e:
        music.load_folder(tmp_path)
    assert str(e.value) == (f"rnnjax.data.music.load_folder: {str(tmp_path)!r} holds no score files; expected "
                            "files ending in .mxl, .musicxml, .xml, .mid, .midi, .krn. Fix: put MusicXML or MIDI "
                            "files there.")


def _nll_loop(probs_at, rolls):
    """Independently: -log p summed over pitches and steps, one Python float at a time, per step."""
    total, steps = 0.0, 0
    for r in rolls:
        for t in range(len(r)):
            for j in range(r.shape[1]):
                p = probs_at(r, t, j)
                total -= math.log(p if r[t, j] else 1.0 - p)
            steps += 1
    return total / steps


def test_baselines_match_a_numpy_loop():
    rng = np.random.default_rng(0)

    def make(n):
        return [(rng.random((int(rng.integers(3, 9)), 5)) < [0.05, 0.3, 0.5, 0.2, 0.0]).astype(np.float32)
                for _ in range(n)]

    p = recipe.Pieces(make(6), make(3), make(3), lowest=40, source="random")
    got = recipe.baselines(p)
    on = [sum(float(r[t, j]) for r in p.train for t in range(len(r))) for j in range(5)]
    n = sum(len(r) for r in p.train)
    freq = [(c + 0.5) / (n + 1) for c in on]

    def repeat(a):
        return lambda r, t, j: (1 - a) * (r[t - 1, j] if t else 0.0) + a * freq[j]

    val = [_nll_loop(repeat(a), p.val) for a in recipe.SMOOTHING]
    a = recipe.SMOOTHING[val.index(min(val))]
    assert got["repeat_smoothing"] == pytest.approx(a)
    assert got["frequency_nll"] == pytest.approx(_nll_loop(lambda r, t, j: freq[j], p.test), rel=1e-9)
    assert got["repeat_nll"] == pytest.approx(_nll_loop(repeat(a), p.test), rel=1e-9)


def _corpus(tmp_path):
    folder = tmp_path / "chorales"
    folder.mkdir()
    bach = {p.name: p for p in music.bach_paths()}
    for name in CHORALES:
        shutil.copy(bach[name], folder / name)
    return folder


def _midi_notes(path):
    """``(pitch, start, end)`` (quarter notes) of every note of a MIDI file, from music21's reader of its events."""
    mf = music21.midi.MidiFile()
    mf.open(str(path))
    mf.read()
    mf.close()
    notes = []
    for track in mf.tracks:
        t, start = 0, {}
        for e in track.events:
            if e.isDeltaTime():
                t += e.time
            elif e.isNoteOn():
                start[e.pitch] = t
            elif e.isNoteOff():
                notes.append((e.pitch, start.pop(e.pitch) / mf.ticksPerQuarterNote, t / mf.ticksPerQuarterNote))
    return sorted(notes)


def _runs(roll, lowest):
    """Independently: each run of steps a pitch is on, as ``(pitch, start, end)`` in quarter notes."""
    notes = []
    for j in range(roll.shape[1]):
        t = 0
        while t < len(roll):
            if roll[t, j]:
                end = t
                while end < len(roll) and roll[end, j]:
                    end += 1
                notes.append((lowest + j, float(t), float(end)))
                t = end
            t += 1
    return sorted(notes)


def test_music_end_to_end_train_eval_generate_and_the_midi_read_back(tmp_path, capsys):
    folder, out = _corpus(tmp_path), tmp_path / "run"
    assert cli.main(["train", "music", "--data", str(folder), "--steps", "4", "--evals", "1", "--hidden", "8",
                     "--batch", "2", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    test = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert test["split"] == "test" and test["test_nll"] == printed["test_nll"]
    for name in ("loss.png", "prediction.png", "sample.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"

    # Independently: the checkpoint's model on the test pieces, the NLL summed in NumPy.
    d = music.load_folder(folder)
    lo, hi = music.pitch_range(d["rolls"])
    rolls = [d["rolls"][i][:, lo:hi + 1].astype(np.float32) for i in recipe.split_pieces(len(d["rolls"]))[2]]
    config = json.loads((out / "config.json").read_text())
    assert (config["lowest_pitch"], config["pitches"]) == (lo, hi - lo + 1)
    model = recipe.build_model(config["settings"], hi - lo + 1, "test")
    ckpt, step = checkpoint.open_run(out, which="best")
    params, _ = ckpt.restore_params(step, jax.eval_shape(model.init, jax.random.key(0)))
    ckpt.close()
    total = 0.0
    for r in rolls:
        x = np.concatenate([np.zeros_like(r[:1]), r[:-1]])
        p = 1 / (1 + np.exp(-np.asarray(model.apply(params, x), np.float64)))
        total -= np.sum(np.where(r > 0, np.log(p), np.log(1 - p)))
    assert test["test_nll"] == pytest.approx(total / sum(len(r) for r in rolls), rel=1e-4)
    assert test["test_steps"] == sum(len(r) for r in rolls) and test["test_pieces"] == len(rolls)

    # `rnnjax eval` reproduces the test NLL; `rnnjax generate` writes MIDI whose notes, read back by music21's
    # MIDI reader, are the runs of the roll the sampler drew (same parameters, seed and temperature).
    assert cli.main(["eval", "--checkpoint", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["test_nll"] == pytest.approx(test["test_nll"], rel=1e-5)
    midi = tmp_path / "g.mid"
    assert cli.main(["generate", "--checkpoint", str(out), "--length", "12", "--seed", "1", "--temperature", "1.5",
                     "--midi", str(midi)]) == 0
    drawn = recipe.sampler(model, hi - lo + 1)(params, jax.random.key(1), 12, 1.5)
    notes = _runs(drawn, lo)
    assert notes and _midi_notes(midi) == notes
    assert capsys.readouterr().err == (f"rnnjax: 12 steps, {len(notes)} notes: {str(midi)!r} and "
                                       f"{str(midi.with_suffix('.png'))!r}\n")
    assert midi.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "C"]) == 2
    assert capsys.readouterr().err == (f"rnnjax: error: rnnjax generate: --prompt is for a character model, and "
                                       f"{str(out)!r} is a music run, which samples each pitch on or off. Fix: drop "
                                       "--prompt.\n")
