"""The environment file of `poller --env-file` (and POLLER_ENV_FILE), read by the rules of
systemd's EnvironmentFile= so one file serves cron and systemd alike: no `$` expansion, and
whatever systemd would read differently or drop is refused with file:line. The accepted
format is in the README (Configuration).
"""

from __future__ import annotations

import re

from poller.config.settings import ConfigError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# systemd's WHITESPACE; \r included, so a file saved with CRLF line ends reads the same.
_BLANK = " \t\r"
_DOUBLE_QUOTE_ESCAPES = '"\\`$'


def read_env_file(path: str) -> dict[str, str]:
    """NAME -> value for every assignment in the file, a later one winning as in systemd.
    A ConfigError gives file:line and never a value."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(f"environment file {path}: cannot read it ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"environment file {path}: not UTF-8 text") from None
    return parse_env_text(text, path)


def parse_env_text(text: str, path: str) -> dict[str, str]:
    assignments: dict[str, str] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        content = line.lstrip(_BLANK)
        if not content.rstrip(_BLANK) or content[0] in "#;":
            continue
        where = f"{path}:{number}"
        name, equals, raw = content.partition("=")
        name = name.rstrip(_BLANK)
        if not equals:
            raise ConfigError(f"{where}: not a NAME=VALUE line")
        if name.startswith("export ") or name.startswith("export\t"):
            raise ConfigError(f"{where}: write NAME=VALUE without 'export' (systemd ignores it)")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{where}: the text before '=' is not a variable name")
        try:
            assignments[name] = _value(raw.lstrip(_BLANK))
        except ValueError as problem:
            raise ConfigError(f"{where}: {name}: {problem}") from None
    return assignments


def _value(raw: str) -> str:
    if raw[:1] in ("'", '"'):
        quote = raw[0]
        value, rest = _quoted(raw[1:], quote)
        if rest.strip(_BLANK):
            raise ValueError("text after the closing quote")
        return value
    chars: list[str] = []
    kept = 0  # length up to the last character that is not trailing whitespace
    escaped = False
    for char in raw:
        if escaped:
            chars.append(char)
            kept, escaped = len(chars), False
        elif char == "\\":
            escaped = True
        else:
            chars.append(char)
            if char not in _BLANK:
                kept = len(chars)
    if escaped:
        raise ValueError("a trailing backslash (values spanning lines are not used)")
    return "".join(chars[:kept])


def _quoted(raw: str, quote: str) -> tuple[str, str]:
    """The value inside the quotes and the text after the closing one."""
    chars: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == quote:
            return "".join(chars), raw[index + 1 :]
        if quote == '"' and char == "\\" and index + 1 < len(raw):
            following = raw[index + 1]
            chars.append(following if following in _DOUBLE_QUOTE_ESCAPES else char + following)
            index += 2
            continue
        chars.append(char)
        index += 1
    raise ValueError("the quote is not closed on this line (values spanning lines are not used)")
