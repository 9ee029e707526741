"""Render the alert email in headless Chromium (Debian's package): DOM, layout and a screenshot.

Used by tests/mail/test_email_render.py, and by `make email-png` to regenerate docs/email.png:

    python -m tests.chromium docs/email.png

The page gets a small script that records where the important elements ended up (bounding
boxes and computed styles) in an attribute of <body>; that changes nothing on screen. PNG
screenshots are decoded with zlib and struct, so no imaging library is needed.
"""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from poller.cli.commands.emails import sample_content
from poller.mail import render_email

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (720, 1000)
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--force-device-scale-factor=1", "--mute-audio",
]  # fmt: skip
_MEASURE = """
<script>
(function () {
  function box(element) {
    var r = element.getBoundingClientRect(), s = getComputedStyle(element);
    return {x: r.x, y: r.y, w: r.width, h: r.height, text: element.textContent.trim(),
            visibility: s.visibility, display: s.display, opacity: s.opacity};
  }
  function find(selector, test) {
    return Array.prototype.slice.call(document.querySelectorAll(selector)).filter(test)[0];
  }
  var button = find("a", function (a) { return a.textContent.trim() === "Add credits"; });
  var title = document.querySelector("h1");
  var balance = find("td", function (td) {
    var label = td.previousElementSibling;
    return label && label.textContent === "Balance";
  });
  document.body.setAttribute("data-layout", JSON.stringify({
    button: button && box(button), href: button && button.href,
    title: title && box(title), balance: balance && box(balance)}));
})();
</script>
"""


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    text: str
    visibility: str
    display: str
    opacity: str


@dataclass(frozen=True)
class Layout:
    button: Box | None
    href: str | None
    title: Box | None
    balance: Box | None


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    rows: list[bytes]  # RGBA, 4 bytes per pixel

    def pixel(self, x: int, y: int) -> tuple[int, int, int]:
        offset = 4 * x
        r, g, b = self.rows[y][offset : offset + 3]
        return r, g, b


def _run(args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="poller-chromium-") as profile:
        result = subprocess.run(
            [str(CHROMIUM), *_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def measured_page(email_html: str, directory: Path) -> Path:
    page = directory / "email.html"
    page.write_text(email_html.replace("</body>", _MEASURE + "</body>"), encoding="utf-8")
    return page


def layout_of(page: Path, window: tuple[int, int] = WINDOW) -> Layout:
    # The same window size as the screenshot, so boxes and pixels line up.
    dom = _run(["--dump-dom", f"--window-size={window[0]},{window[1]}", page.as_uri()])
    match = re.search(r'data-layout="([^"]*)"', dom)
    if match is None:
        raise RuntimeError("the measuring script did not run")
    data = json.loads(html.unescape(match.group(1)))
    return Layout(
        button=Box(**data["button"]) if data["button"] else None,
        href=data["href"],
        title=Box(**data["title"]) if data["title"] else None,
        balance=Box(**data["balance"]) if data["balance"] else None,
    )


def screenshot(page: Path, png: Path, window: tuple[int, int] = WINDOW) -> None:
    _run([f"--screenshot={png}", f"--window-size={window[0]},{window[1]}", page.as_uri()])
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot to {png}")


def read_png(path: Path) -> Image:
    """8-bit RGB or RGBA, non-interlaced: what Chromium writes."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    position, chunks, header = 8, [], b""
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    channels = {2: 3, 6: 4}.get(color)
    if depth != 8 or channels is None or interlace:
        raise ValueError(f"unsupported PNG: depth {depth}, colour type {color}")
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        row = _unfilter(
            raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, channels
        )
        previous = row
        rows.append(bytes(row) if channels == 4 else _rgb_to_rgba(row))
    return Image(width, height, rows)


def _unfilter(kind: int, row: bytearray, up: bytearray, bpp: int) -> bytearray:
    for i in range(len(row)):
        left = row[i - bpp] if i >= bpp else 0
        above = up[i]
        upper_left = up[i - bpp] if i >= bpp else 0
        if kind == 1:
            row[i] = (row[i] + left) & 0xFF
        elif kind == 2:
            row[i] = (row[i] + above) & 0xFF
        elif kind == 3:
            row[i] = (row[i] + (left + above) // 2) & 0xFF
        elif kind == 4:
            p = left + above - upper_left
            pa, pb, pc = abs(p - left), abs(p - above), abs(p - upper_left)
            predictor = left if pa <= pb and pa <= pc else above if pb <= pc else upper_left
            row[i] = (row[i] + predictor) & 0xFF
    return row


def _rgb_to_rgba(row: bytearray) -> bytes:
    out = bytearray()
    for i in range(0, len(row), 3):
        out += row[i : i + 3] + b"\xff"
    return bytes(out)


def sample_email_html() -> str:
    now = datetime(2026, 5, 1, 14, 3, tzinfo=UTC)
    content = sample_content("https://dashboard.cekura.ai/settings/org/billing", now)
    return render_email(content).html


def main(out: str) -> None:
    """Regenerate the README's picture of the email from a real render."""
    with tempfile.TemporaryDirectory() as directory:
        page = Path(directory) / "email.html"
        page.write_text(sample_email_html(), encoding="utf-8")
        screenshot(page, Path(out), window=(720, 600))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/email.png")
