# The two set-up commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
export PATH := $(BIN):$(PATH)
export MERGEME_HOME ?= $(CURDIR)/.mergeme
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export DVC_SITE_CACHE_DIR := $(MERGEME_HOME)/dvc-site-cache
export PREFECT_SERVER_ANALYTICS_ENABLED := false

DEMO_MODELS := base math code knowledge

.PHONY: install demo demo-data test lint format clean

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: this CPU build installs from the local disk
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# the DVC stages: demo data, then the tiny base model and its three experts
demo-data: install
	$(BIN)/dvc repro

demo: demo-data
	for model in $(DEMO_MODELS); do \
	  $(BIN)/mergeme register-checkpoint data/experts/$$model --name mergeme-demo-$$model || exit 1; \
	done
	$(BIN)/mergeme run -c configs/demo.yaml
	# the same inputs again: every step comes from the cache and nothing new is registered
	$(BIN)/mergeme run -c configs/demo.yaml
	# gate the release on mlflow/promotion_policy.yaml and make it the champion
	$(BIN)/mergeme promote mergeme-demo-moe --version @candidate --reason "demo release"
	# what produced the champion
	$(BIN)/mergeme audit mergeme-demo-moe@champion

test: install
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(MERGEME_HOME)
