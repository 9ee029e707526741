"""The test databases accept every PostgreSQL URL poller accepts (tests/fixtures/database.py)."""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from poller.store import normalize_database_url
from tests.fixtures.database import POSTGRES_URL_VARIABLE, fresh_postgres_database


def test_a_bare_postgresql_url_means_psycopg2_and_other_drivers_are_kept() -> None:
    assert normalize_database_url("postgresql://u@h/d").drivername == "postgresql+psycopg2"
    assert normalize_database_url("postgresql+pg8000://u@h/d").drivername == "postgresql+pg8000"
    assert normalize_database_url("sqlite:///x.db").drivername == "sqlite"


@pytest.mark.postgres
@pytest.mark.parametrize("driver", ["postgresql", "postgresql+psycopg2"])
def test_the_fixture_opens_a_fresh_database_from_either_spelling_of_the_url(
    driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    configured = os.environ.get(POSTGRES_URL_VARIABLE)
    if not configured:
        pytest.skip(f"{POSTGRES_URL_VARIABLE} is not set")
    spelled = make_url(configured).set(drivername=driver)
    monkeypatch.setenv(POSTGRES_URL_VARIABLE, spelled.render_as_string(hide_password=False))
    databases = fresh_postgres_database()
    url = next(databases)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            name = connection.execute(text("SELECT current_database()")).scalar_one()
        assert name == make_url(url).database and name.startswith("poller_test_")
    finally:
        engine.dispose()
        databases.close()  # drops the database
