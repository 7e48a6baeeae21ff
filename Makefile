# The two set-up commands: `make demo` (the main job on the embedded default) and `make test`.
# Each creates .venv/ and installs the pinned stack (constraints.txt) and the project on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | cksum | cut -d' ' -f1)
SELFSUP := $(VENV)/bin/selfsup
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup data demo test test-slow clean

$(STAMP): constraints.txt pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

data: $(STAMP)
	@$(VENV)/bin/python -m selfsup.jobs.data --install-missing

demo: data
	$(SELFSUP) demo $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m slow -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
