# Two commands: `make test` and `make demo`. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Re-install only when the dependency list changes.
STAMP := $(VENV)/.sigscale-installed-$(shell sha1sum pyproject.toml | cut -c1-12)

# Offline, CPU-friendly defaults for everything the Makefile runs.
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export PYTHONUNBUFFERED := 1

.PHONY: setup test test-fast demo bench clean slurm-up slurm-down

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools
	# torch first and pinned: torchvision 0.29.1 imports only beside torch 2.14.1.
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-build-isolation -e '.[test]'
	$(PIP) check
	@rm -f $(VENV)/.sigscale-installed-*
	@touch $@

test: setup slurm-up
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not multiproc and not slow and not slurm"

demo: setup
	$(VENV)/bin/sigscale demo --out demo_out

bench: setup
	$(VENV)/bin/sigscale bench loss --out bench_results/loss.json

# The Slurm clusters the Slurm tests submit to (slurm/local_cluster.sh: apt install on first use, needs
# root): the single-node one, and the two-node one (a network namespace per node). Where they cannot run
# (exit 3) their tests skip, except under CI=true where that fails.
slurm-up:
	@for mode in "" two-node; do bash slurm/local_cluster.sh start $$mode || { rc=$$?; \
	  if [ $$rc -eq 3 ] && [ "$$CI" != true ]; then echo "make: no local Slurm here: the Slurm tests will skip"; \
	  else exit $$rc; fi; }; done

slurm-down:
	bash slurm/local_cluster.sh stop
	bash slurm/local_cluster.sh stop two-node

clean:
	rm -rf demo_out bench_results .pytest_cache
