# Self-documenting: `make help` lists every target with its ## comment.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
# Debian packages the tests and the demo need (real product photos for the demo and the
# known-answer test). Installed when missing; apt needs root.
APT_PACKAGES := dataset-fashion-mnist

.DEFAULT_GOAL := help
.PHONY: help setup apt-deps test demo lint clean

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

apt-deps: ## Install the Debian packages the tests and the demo need
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt-get install$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	fi

$(VENV)/.installed: setup.py requirements.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (torch and Beam pins); set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -e '.[dev]'
	touch $@

setup: apt-deps $(VENV)/.installed ## Create the virtualenv with pinned dependencies and install system packages

test: setup ## Set everything up and run the whole test suite
	$(PY) -m pytest -q tests

demo: setup ## Set everything up and run the embed pipeline on a sample catalogue of real product photos
	$(PY) -m localstack.demo --output_dir $(OUT)/demo

lint: setup ## Byte-compile everything (catches syntax errors on every module)
	$(PY) -m compileall -q pipelines model_handlers transforms search localstack schemas.py tests

clean: ## Remove outputs (keeps the virtualenv)
	rm -rf $(OUT) .pytest_cache
