"""Shared fixtures live in tests/fixtures/, one module per real part we run in tests."""

pytest_plugins = [
    "tests.fixtures.database",
    "tests.fixtures.smtp",
    "tests.fixtures.api",
    "tests.fixtures.world",
]
