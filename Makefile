# evaclip developer commands. Everything installs into .venv; torch is pinned to the build on this machine's disk.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.installed
DEMO    ?= demo_data
RUNS    ?= runs

.PHONY: install demo test test-gpu test-fast bench gpu-check lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# the EVA bootstrap on the digits (docs/DEMO.md): CLIP from scratch -> MIM student -> EVA-CLIP, in RUNS/demo_cpu,
# RUNS/demo_mim_cpu and RUNS/demo_eva_clip_cpu; the 5-seed table: python -m evaclip.demo --seeds 0 1 2 3 4 (docs/DEMO.md)
demo: $(STAMP)
	$(BIN)/python -m evaclip.demo --data $(DEMO) --runs $(RUNS)

# pytest exit code 5 (no tests collected) is not a failure of the suite
test: $(STAMP)
	$(BIN)/python -m pytest -q tests -m "not gpu" -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests -m gpu; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m evaclip.bench all --out bench_results

# On a CUDA machine (about 5-8 minutes on one H100): install the flash kernel this GPU runs, wheels only (never an
# hour-long FA2 compile): FlashAttention-4 on compute capability >= 9.0 (Hopper, Blackwell), FA2 on 8.x where a wheel
# exists, else none (SDPA); then the CUDA tests and one benchmark report, bench_results/gpu-check.md (B/16, bf16,
# token drop 0 and 0.5, flash_attn and sdpa, vs open_clip, batch GPU_BATCH per GPU).
GPU_BATCH ?= 128
gpu-check: $(STAMP)
	@cap=$$($(BIN)/python -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0); print(10 * c[0] + c[1])"); \
	if [ "$$cap" -eq 0 ]; then echo "gpu-check: torch sees no CUDA device"; exit 1; fi; \
	if [ "$$cap" -ge 90 ]; then \
	  $(BIN)/pip install -q --only-binary=:all: "flash-attn-4>=4.0.0b36" $(TORCH) || echo "gpu-check: no FA4 wheels here: SDPA only"; \
	elif [ "$$cap" -ge 80 ]; then \
	  $(BIN)/pip install -q --only-binary=:all: "flash-attn>=2.6" $(TORCH) || echo "gpu-check: no FA2 wheel for this torch / CUDA: SDPA only"; \
	else echo "gpu-check: compute capability $$cap: flash-attn needs >= 8.0, SDPA only"; fi
	$(BIN)/python -m pytest -q tests -m gpu -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	$(BIN)/python -m evaclip.bench gpu-check --out bench_results --batch $(GPU_BATCH) || rc=1; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check evaclip data_tools tests

clean:
	rm -rf $(VENV) $(DEMO) runs bench_results .pytest_cache
