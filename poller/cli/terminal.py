"""What the CLI prints: text from the API made harmless for a terminal.

Organization and member names, emails and error details come from the API. Printed raw, an
escape sequence in one could clear lines, fake table rows or write the clipboard (OSC 52), and
a bidi override could make a name read as another. Every CLI printing path goes through
``echo`` (or ``echo_json``), which shows such characters as escapes instead of obeying them.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import click

from poller.engine.model import BIDI_CONTROLS

_KEPT = frozenset("\n\t")  # the CLI's own line breaks and the email text's


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_for_terminal(text: str) -> str:
    """C0 and C1 controls (not newline, tab), DEL and bidi controls as ``\\x1b``-style escapes."""
    if text.isascii() and text.isprintable():
        return text  # the common case: nothing to look at character by character
    return "".join(
        _escape(char)
        if char not in _KEPT and (unicodedata.category(char) == "Cc" or ord(char) in BIDI_CONTROLS)
        else char
        for char in text
    )


def echo(text: str = "", *, err: bool = False, nl: bool = True) -> None:
    click.echo(safe_for_terminal(text), err=err, nl=nl)


def echo_json(value: Any) -> None:
    # json.dumps escapes C0 controls and (ensure_ascii) everything beyond ASCII, C1 and bidi
    # controls included, but leaves DEL as it is: DEL only ever occurs inside a string there.
    click.echo(json.dumps(value, indent=2).replace("\x7f", "\\u007f"))
