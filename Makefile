# The README's commands: `make demo`, `make test`, `make bench`. All build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench lint clean email-png chaos

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check poller tests bench
	$(PY) -m pytest -q -n auto

# The crash/concurrency harness at a large size (tests/reliability/harness.py; a few minutes).
CHAOS_ARGS ?= --processes 4 --cycles 15 --orgs 60 --kill-rate 0.3
chaos: $(STAMP)
	$(PY) -m tests.reliability.harness $(CHAOS_ARGS)
	if [ -n "$$POLLER_TEST_DATABASE_URL" ]; then $(PY) -m tests.reliability.harness $(CHAOS_ARGS) --postgres; fi

demo: $(STAMP)
	$(PY) -m poller.demo

# 1k/10k/100k orgs on SQLite and PostgreSQL (POLLER_TEST_DATABASE_URL); see docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(PY) -m ruff check poller tests bench
	$(PY) -m ruff format --check poller tests bench

# The README's picture of the alert email, from a real render in headless Chromium.
email-png: $(STAMP)
	$(PY) -m tests.chromium docs/email.png

clean:
	rm -rf $(VENV) build *.egg-info
