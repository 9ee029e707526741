"""Alembic migrations for the alert-state store (script_location ``poller.store:migrations``)."""
