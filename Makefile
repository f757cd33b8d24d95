# make repro | make test | make serve | make release | make container  -- each sets up .venv first (only when pyproject.toml changed).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 3000
IMAGE ?= fullstack-ml:latest
export PATH := $(CURDIR)/$(BIN):$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export BENTOML_DO_NOT_TRACK := true

.PHONY: install repro test test-fast serve release container device params lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

repro: $(STAMP)  ## run the pipeline: data -> profile -> model -> INT8 -> bento
	$(BIN)/dvc repro

test: $(STAMP)  ## the whole test suite, end-to-end tests included, on two workers (tests/conftest.py)
	$(BIN)/python -m pytest -n 2

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -m "not slow"

serve: $(STAMP)  ## serve the bento `make repro` built (dist/*.bento), or a release: VERSION=x.y.z | STAGE=prod
	@set -e; \
	if [ -n "$(VERSION)$(STAGE)" ]; then \
	  got=$$($(BIN)/python -m fullstack_ml.release fetch $(if $(VERSION),--version $(VERSION),--stage $(STAGE)) -o build/release); \
	  set -- $$got; export FULLSTACK_ML_RELEASE=$$1; bento=$$2; \
	else \
	  bento=$$(ls dist/*.bento 2>/dev/null | head -1); \
	  [ -n "$$bento" ] || { echo "error: no dist/*.bento; run make repro first"; exit 1; }; \
	fi; \
	rm -rf build/bento && mkdir -p build/bento && tar -xJf $$bento -C build/bento; \
	echo "serving $$bento$${FULLSTACK_ML_RELEASE:+ ($$FULLSTACK_ML_RELEASE)}"; \
	exec $(BIN)/bentoml serve $(CURDIR)/build/bento --host $(HOST) --port $(PORT)

release: $(STAMP)  ## register the build as VERSION=x.y.z in DVC's model registry; STAGE=prod promotes
	@test -n "$(VERSION)" || { echo "error: make release VERSION=x.y.z [STAGE=prod]"; exit 1; }
	$(BIN)/python -m fullstack_ml.release register $(VERSION) $(if $(STAGE),--stage $(STAGE))

container: $(STAMP)  ## OCI image of the bento in dist/ with podman (offline base image): $(IMAGE)
	bash deploy/container.sh $(IMAGE)

device: $(STAMP)  ## models/device: model.onnx, preprocess.json, schema.json and runner.py (numpy + onnxruntime; Pillow for an image model)
	$(BIN)/dvc repro device

params: $(STAMP)  ## recompose params.yaml from conf/ (what `dvc exp run` does)
	$(BIN)/python -m fullstack_ml.stage

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:  ## remove the virtual environment and caches (not DVC's cache)
	rm -rf $(VENV) .pytest_cache .ruff_cache
