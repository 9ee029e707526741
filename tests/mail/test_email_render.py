"""The email as a person sees it: rendered by headless Chromium, checked on the DOM and pixels.

Chromium comes from Debian's `chromium` package (.ci/run installs it). Outside CI a machine
without it skips these tests; under CI its absence is a failure, not a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chromium import (
    CHROMIUM,
    WINDOW,
    Box,
    Image,
    Layout,
    layout_of,
    measured_page,
    read_png,
    sample_email_html,
    screenshot,
)

BUTTON_BLUE = (0x25, 0x63, 0xEB)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Layout, Image]]:
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"Chromium is required under CI: {message}", pytrace=False)
        pytest.skip(message)
    directory = tmp_path_factory.mktemp("email-render")
    page = measured_page(sample_email_html(), directory)
    png = directory / "email.png"
    screenshot(page, png)
    yield layout_of(page), read_png(png)


def near(color: tuple[int, int, int], target: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, target, strict=True))


def pixels_in(image: Image, box: Box) -> list[tuple[int, int, int]]:
    return [
        image.pixel(x, y)
        for y in range(int(box.y) + 1, int(box.y + box.h) - 1)
        for x in range(int(box.x) + 1, int(box.x + box.w) - 1)
    ]


def on_screen(box: Box | None) -> bool:
    return (
        box is not None
        and box.w > 0
        and box.h > 0
        and box.x >= 0
        and box.y >= 0
        and box.x + box.w <= WINDOW[0]
        and box.y + box.h <= WINDOW[1]
        and box.visibility == "visible"
        and box.display != "none"
        and float(box.opacity) > 0.9
    )


def test_the_email_shows_the_organization_name_in_its_heading(rendered) -> None:
    layout, _ = rendered
    assert on_screen(layout.title)
    assert layout.title.text == "Example Voice Labs is low on credits"


def test_the_email_shows_the_balance_in_red(rendered) -> None:
    layout, image = rendered
    assert on_screen(layout.balance)
    assert layout.balance.text == "412.50 credits"
    reds = [p for p in pixels_in(image, layout.balance) if p[0] > 140 and p[1] < 90 and p[2] < 90]
    assert len(reds) >= 20  # the text is drawn, in the template's red


def test_the_add_credits_button_is_visible_above_the_fold_and_blue(rendered) -> None:
    layout, image = rendered
    assert on_screen(layout.button), layout.button
    assert layout.href == "https://dashboard.cekura.ai/settings/org/billing"
    assert layout.button.w >= 100 and layout.button.h >= 36  # a target, not a text link
    pixels = pixels_in(image, layout.button)
    blue = sum(near(p, BUTTON_BLUE) for p in pixels) / len(pixels)
    white = sum(near(p, (255, 255, 255), 30) for p in pixels) / len(pixels)
    assert blue > 0.75, f"only {blue:.0%} of the button is button-blue"
    assert white > 0.03, "the button's label is not drawn in white"


def test_the_screenshot_in_the_docs_exists_and_is_a_png() -> None:
    image = read_png(Path(__file__).resolve().parents[2] / "docs" / "email.png")
    assert image.width >= 600 and image.height >= 400
