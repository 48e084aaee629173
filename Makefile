# evaclip developer commands. Everything installs into .venv; torch is pinned to the build on this machine's disk.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.installed
DEMO    ?= demo_data
RUN     ?= runs/demo_cpu

.PHONY: install demo test test-gpu test-fast bench lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m evaclip.demo --data $(DEMO) --run $(RUN)

# pytest exit code 5 (no tests collected) is not a failure of the suite
test: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not gpu" -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests -m gpu; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m evaclip.bench all --out bench_results

lint: $(STAMP)
	$(BIN)/ruff check evaclip data_tools tests

clean:
	rm -rf $(VENV) $(DEMO) runs bench_results .pytest_cache
