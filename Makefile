# Two commands: `make run` (the main job on the embedded default) and `make test`.
# Both create .venv on first use and install the toolkit with the CPU torch pin.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/standard.toml

.PHONY: run defenses test install clean

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

# Pre-training, then the S2L table, then the paper's ablations; every stage is cached,
# so a second run (or one resumed after an interruption) only does what is missing.
run: $(BIN)/.installed
	$(BIN)/s2l-guard pretrain --config $(CONFIG)
	$(BIN)/s2l-guard attack --config $(CONFIG)
	$(BIN)/s2l-guard ablate lora-rank ti-tokens gaussian --config $(CONFIG)

# The S2L table against every defense (docs/defenses.md), then a one-line-per-defense summary.
defenses: $(BIN)/.installed
	$(BIN)/s2l-guard attack --config $(CONFIG) --defense all

test: $(BIN)/.installed
	$(BIN)/python -m pytest

clean:
	rm -rf .s2l-cache runs
