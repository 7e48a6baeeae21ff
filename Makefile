# The two set-up commands: `make demo` (the main job on the embedded default) and `make test`.
# Each creates .venv/ and installs the pinned stack (constraints.txt) and the project on first use.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat constraints.txt pyproject.toml | cksum | cut -d' ' -f1)
SELFSUP := $(VENV)/bin/selfsup
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup data demo test test-e2e test-quick test-cluster test-cluster-ci quality test-slow typecheck ci clean gpu-check gpu-check-prepare

$(STAMP): constraints.txt pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -c constraints.txt -e '.[test,export,mlflow,bench]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

data: $(STAMP)
	@$(VENV)/bin/python -m selfsup.jobs.data --install-missing

demo: data
	$(SELFSUP) demo $(DEMO_ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# The longest end-to-end runs (marker e2e: job submission to a Ray cluster, multi-worker Ray Train
# runs, resume-to-the-same-losses, the GPU recipes at a tiny size); CI runs them after `make test`.
test-e2e: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m e2e -p no:cacheprovider $(PYTEST_ARGS)

# The quick end-to-end learning bars (one per modality, about 5 minutes each; CI runs them).
test-quick: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m quick -p no:cacheprovider $(PYTEST_ARGS)

# A real multi-node Ray cluster on this machine (tests/cluster: a head, two stream nodes, two
# trainer nodes, each its own raylet; nodes removed mid-epoch and mid-run). Its own process: a
# driver connects to one cluster. CI runs the fastest of them (test-cluster-ci).
test-cluster: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m cluster -p no:cacheprovider tests/cluster $(PYTEST_ARGS)

test-cluster-ci: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m cluster -p no:cacheprovider tests/cluster -k "stream_node_removed or eval_workers" $(PYTEST_ARGS)

# The full 20-minute representation-quality bars of docs/quality.md. Run them, and record their
# figures, before landing any change to objectives, recipes, augmentations, backbones or the
# sample path of the pipeline (CONTRIBUTING.md).
quality: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m quality -p no:cacheprovider $(PYTEST_ARGS)

test-slow: quality

typecheck: $(STAMP)
	@bash tests/typecheck.sh

# The one GPU measurement (jobs/bench/gpu_check.py), for a machine with one NVIDIA GPU: the system
# python3 with torch, no .venv, no Ray, no network. It exits 2 at once, saying why, without a GPU.
# `make gpu-check-prepare` (here, before) copies the photos and the pure-Python modules that
# machine lacks into .gpu-check/, which travels with the checkout.
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) jobs/bench/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-prepare: $(STAMP)
	$(VENV)/bin/python jobs/bench/gpu_check.py --prepare $(GPU_CHECK_ARGS)

# What CI runs (.ci/run): the default suite, the e2e runs, one multi-node fault test, the quick bars, the type check.
ci: test test-e2e test-cluster-ci test-quick typecheck

clean:
	rm -rf runs .pytest_cache
