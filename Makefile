# Two commands: `make run` (the main job on the embedded default) and `make test`.
# Both create .venv on first use and install the toolkit with the CPU torch pin.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/standard.toml

.PHONY: run defenses gates test test-slow lint install clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Pre-training, the S2L table, the paper's ablations, then the defense x attack matrix and
# its report; every stage is cached, so a second run (or one resumed after an interruption)
# only does what is missing.
run: $(BIN)/.installed
	$(BIN)/s2l-guard pretrain --config $(CONFIG)
	$(BIN)/s2l-guard attack --config $(CONFIG)
	$(BIN)/s2l-guard ablate lora-rank ti-tokens gaussian --config $(CONFIG)
	$(BIN)/s2l-guard matrix --config $(CONFIG)

# The release gates on the matrix `make run` measured (docs/gates.md); exits 1 when a gate fails.
gates: $(BIN)/.installed
	$(BIN)/python -m pytest suites/ --s2l-config $(CONFIG) --junitxml gates.xml

# The S2L table against every defense (docs/defenses.md), then a one-line-per-defense summary.
defenses: $(BIN)/.installed
	$(BIN)/s2l-guard attack --config $(CONFIG) --defense all

# The fast tier: unit, property and one small end-to-end run, one worker per core (each
# worker's threads are sized in conftest.py); test files stay whole on one worker, so a
# module's shared fixture is built once.
test: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow" -n auto --dist loadfile

# The slow tier: whole tables, matrices and gate suites through the CLI and in subprocesses.
test-slow: $(BIN)/.installed
	$(BIN)/python -m pytest -m slow -n auto --dist loadfile

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf .s2l-cache runs
