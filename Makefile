# Self-documenting: `make help` lists every target with its ## comment.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
# Debian packages the tests and the demo need: real product photos (demo, known-answer test)
# Java for the Pub/Sub emulator, Chromium for the search-page test, tcmalloc for torch on the CPU.
# Installed when missing; apt needs root.
APT_PACKAGES := dataset-fashion-mnist openjdk-17-jre-headless chromium chromium-driver libtcmalloc-minimal4
# Jobs run on tcmalloc: torch on the CPU is about twice as fast as on glibc's malloc (model_handlers/allocator.py).
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
RUN = $(if $(wildcard $(TCMALLOC)),LD_PRELOAD=$(TCMALLOC) )$(PY)
PUBSUB_EMULATOR_BIN ?= /usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator
export PUBSUB_EMULATOR_BIN

.DEFAULT_GOAL := help
.PHONY: help setup apt-deps pubsub-emulator test demo rollout bench eval lint clean deploy-infra build-image build-templates launch-embed launch-index launch-search rollout-deploy

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

apt-deps: ## Install the Debian packages the tests and the demo need
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt-get install$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing Debian packages:$$missing -- run: sudo apt-get install -y$$missing" >&2; exit 1; fi; \
	fi

pubsub-emulator: ## Check for Google's Pub/Sub emulator; install it from apt where the Cloud SDK repository is set up
	@test -x "$(PUBSUB_EMULATOR_BIN)" || { \
	  [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq google-cloud-cli-pubsub-emulator >/dev/null 2>&1; } || { \
	  echo "The Pub/Sub emulator is missing ($(PUBSUB_EMULATOR_BIN))." >&2; \
	  echo "Install it with: sudo apt-get install google-cloud-cli-pubsub-emulator  (needs Google's Cloud SDK apt repository," >&2; \
	  echo "see https://cloud.google.com/sdk/docs/install#deb), or: gcloud components install pubsub-emulator," >&2; \
	  echo "then point PUBSUB_EMULATOR_BIN at its bin/cloud-pubsub-emulator." >&2; exit 1; }

$(VENV)/.installed: setup.py requirements.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (torch and Beam pins); set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -r requirements.txt -e '.[dev]'
	touch $@

setup: apt-deps pubsub-emulator $(VENV)/.installed ## Create the virtualenv with pinned dependencies and install system packages

test: setup ## Set everything up and run the whole test suite
	$(PY) -m pytest -q tests

demo: setup ## Set everything up; real product photos → Pub/Sub → embed → BigQuery + index → search (SERVE=1 keeps the page up; BACKEND=qdrant: a Qdrant collection)
	$(RUN) -m localstack.demo --output_dir $(OUT)/demo $(if $(SERVE),--serve,) $(if $(BACKEND),--backend $(BACKEND),)

# make rollout MODEL=SPEC PROJECTION=HEAD (make eval writes a head under out/eval-heads/); none: the default model again.
rollout: setup ## Roll a new model (or head) out locally: new streaming jobs, backfill, gate, alias switch, search answering throughout (BACKEND=qdrant: on collections)
	$(RUN) -m localstack.rollout --model $(or $(MODEL),packaged:effnet-lite0+minilm) $(if $(PROJECTION),--projection $(PROJECTION),) \
	  --products 300 --qrels evaluation/judged/demo.jsonl --photos fashion-mnist --output_dir $(OUT)/rollout \
	  $(if $(BACKEND),--backend $(BACKEND),)

BENCHMARKS := decode pipeline memory batching index scale exact_switch search_latency page_memory freshness_scale backfill_scale gpu_readiness allocator qdrant_recall decode_scaling

bench: setup ## Run every benchmark; each prints its figures against its baseline and writes bench/results/NAME.json
	$(RUN) -m bench.freshness --output_dir $(OUT)/bench-freshness
	set -e; for name in $(BENCHMARKS); do echo "== bench.$$name"; $(RUN) -m bench.$$name; done

eval: setup ## Retrieval quality on Fashion-MNIST, pretrained vs top-tuned (bench/results/quality.*; ~5 min)
	$(RUN) -m evaluation.run --dataset fashion-mnist --cache_dir $(OUT)/eval-cache --head_dir $(OUT)/eval-heads

# Deployment: settings from the environment or .env (PROJECT, REGION, BUCKET, ...; see docs/DEPLOY.md).
# DRY_RUN=1 prints every command and runs none.
DEPLOY := PYTHON=$(abspath $(PY)) bash deploy/deploy.sh

deploy-infra: setup ## Create topics, subscriptions, dataset/tables, bucket, registry, service account (idempotent)
	$(DEPLOY) infra

build-image: ## Build and push the GPU worker / Flex Template launcher image with Cloud Build
	$(DEPLOY) build-image

build-templates: setup ## Regenerate the Flex Template metadata and build both template specs
	$(DEPLOY) build-templates

launch-embed: ## Launch the streaming embed job on Dataflow with GPU workers
	$(DEPLOY) launch-embed

launch-index: ## Launch the streaming index job on Dataflow (Flex Template; per shard to gs://BUCKET/indexes, or SINK=qdrant QDRANT_URL=... into a collection)
	$(DEPLOY) launch-index

launch-search: ## Create search replicas per shard group (managed instance groups, internal load balancers) and the router
	$(DEPLOY) launch-search

rollout-deploy: ## Print (DRY_RUN=1) or run the rollout of MODEL/PROJECTION as INDEX_NAME on Google Cloud (docs/DEPLOY.md §5)
	$(DEPLOY) rollout

lint: setup ## ruff: undefined names, unused imports, syntax errors
	$(VENV)/bin/ruff check --select F,E9 --exclude $(VENV) .

clean: ## Remove outputs (keeps the virtualenv)
	rm -rf $(OUT) .pytest_cache
