"""Text from the API made harmless for a terminal: tables of known tricks, and a property."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poller.cli.terminal import BIDI_CONTROLS, safe_for_terminal


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("Acme Voice", "Acme Voice"),
        ("Caf\u00e9 \u4e2d \U0001f600", "Caf\u00e9 \u4e2d \U0001f600"),
        ("two\nlines\tand a tab", "two\nlines\tand a tab"),
        ("Evil\x1b]52;c;AAAA\x07", "Evil\\x1b]52;c;AAAA\\x07"),  # OSC 52: write the clipboard
        ("\x1b[2K\rfake row", "\\x1b[2K\\x0dfake row"),  # clear the line, overwrite it
        ("csi\x9b31m", "csi\\x9b31m"),  # the one-byte C1 CSI
        ("del\x7f", "del\\x7f"),
        ("\u202etxt.exe", "\\u202etxt.exe"),  # right-to-left override
        ("nul\x00", "nul\\x00"),
    ],
)
def test_controls_are_shown_as_escapes_and_everything_else_as_it_is(text: str, shown: str) -> None:
    assert safe_for_terminal(text) == shown


@given(st.text())
def test_nothing_a_terminal_would_obey_survives(text: str) -> None:
    safe = safe_for_terminal(text)
    for char in safe:
        assert char in "\n\t" or unicodedata.category(char) != "Cc"
        assert ord(char) not in BIDI_CONTROLS
    assert safe_for_terminal(safe) == safe
