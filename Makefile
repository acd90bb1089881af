# make run: install the pinned requirements and serve MODEL on PORT (Ctrl-C stops).
# make test: install the test requirements and run the whole suite (two workers; the process-level tests on one).
# make bench / make sweep: the side-by-side benchmark and the batching sweep (bench/results/).
# make bench-overload: goodput, refusals and latency from 0.5x to 10x capacity (bench/results/overload.*).
# make bench-model: one model server draining a full queue against its model's predict ceiling.
# make bench-clients: 1 to 10,000 concurrent clients against the default deployment (bench/results/clients.*).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench sweep bench-overload bench-model bench-clients

run: $(VENV)/.run-deps
	$(BIN)/python scripts/run.py

test: $(VENV)/.test-deps
	bash scripts/install_browser.sh
	$(BIN)/python -m pytest -n 2 --dist loadgroup

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .

bench: $(VENV)/.test-deps
	$(BIN)/python -m bench.run

sweep: $(VENV)/.test-deps
	$(BIN)/python -m bench.sweep

bench-overload: $(VENV)/.test-deps
	$(BIN)/python -m bench.overload

bench-model: $(VENV)/.test-deps
	$(BIN)/python -m bench.model_tier

bench-clients: $(VENV)/.test-deps
	$(BIN)/python -m bench.clients

$(VENV)/.run-deps: requirements.txt requirements-web.txt requirements-load.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-load.txt
	touch $@

$(VENV)/.test-deps: $(VENV)/.run-deps requirements-dev.txt
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@
