# The README's commands: `make demo`, `make test`, `make bench`. All build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check poller tests bench
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m poller.demo

# 1k/10k/100k orgs on SQLite and PostgreSQL (POLLER_TEST_DATABASE_URL); see docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check poller tests bench
	$(PY) -m ruff format --check poller tests bench

clean:
	rm -rf $(VENV) build *.egg-info
