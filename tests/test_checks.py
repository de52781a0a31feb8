"""The shared validators of rnnjax/_checks.py: what they accept, and their exact "expected / got / Fix:" messages."""

import numpy as np
import pytest

from rnnjax._checks import is_int, is_number, require_choice, require_int


def test_integers_and_numbers_exclude_bools():
    assert [is_int(v) for v in (3, np.int32(3), True, 3.0, "3", None)] == [True, True, False, False, False, False]
    assert [is_number(v) for v in (3, 2.5, np.float32(1), False, "1")] == [True, True, True, False, False]


def test_require_int_returns_the_value_and_words_its_bounds():
    assert require_int("f", "n", 4) == 4 and require_int("f", "k", None, optional=True) is None
    cases = [
        (dict(value=0), "f: n must be an integer >= 1, got 0."),
        (dict(value=True, fix="pass n=2."), "f: n must be an integer >= 1, got True. Fix: pass n=2."),
        (dict(value=-1, low=0, why="steps"), "f: n must be an integer >= 0 (steps), got -1."),
        (dict(value=9, high=5, optional=True), "f: n must be None or an integer in [1, 5], got 9."),
        (dict(value=3, high=2, high_label="beam_width=2"), "f: n must be an integer in [1, beam_width=2], got 3."),
    ]
    for kwargs, message in cases:
        value = kwargs.pop("value")
        with pytest.raises(ValueError) as e:
            require_int("f", "n", value, **kwargs)
        assert str(e.value) == message


def test_require_choice():
    assert require_choice("f", "kind", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError) as e:
        require_choice("f", "kind", "c", ("a", "b"))
    assert str(e.value) == "f: unknown kind 'c'; expected one of a, b. Fix: pass one of those."
