# The README's two commands: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint clean email-png

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

lint: $(STAMP)
	$(PY) -m ruff check poller tests bench
	$(PY) -m ruff format --check poller tests bench

# The README's picture of the alert email, from a real render in headless Chromium.
email-png: $(STAMP)
	$(PY) -m tests.chromium docs/email.png

clean:
	rm -rf $(VENV) build *.egg-info
