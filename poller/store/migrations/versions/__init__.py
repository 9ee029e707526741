"""Alembic revision scripts, applied in order by ``poller db upgrade``."""
