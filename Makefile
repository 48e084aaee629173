# evaclip developer commands. Everything installs into .venv; torch is pinned to the build on this machine's disk (the
# CPU suite runs on it; evaclip itself supports torch >= 2.11, see setup.cfg).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   := torch==2.14.1 torchvision==0.29.1
STAMP   := $(VENV)/.installed
DEMO    ?= demo_data
RUNS    ?= runs

.PHONY: install demo test test-gpu test-fast bench gpu-check gpu-venv wheelhouse lint clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,wandb]" $(TORCH)
	touch $(STAMP)

install: $(STAMP)

# the EVA bootstrap on the digits (docs/DEMO.md): CLIP from scratch -> MIM student -> EVA-CLIP, in RUNS/demo_cpu,
# RUNS/demo_mim_cpu and RUNS/demo_eva_clip_cpu; the 5-seed table: python -m evaclip.demo --seeds 0 1 2 3 4 (docs/DEMO.md)
demo: $(STAMP)
	$(BIN)/python -m evaclip.demo --data $(DEMO) --runs $(RUNS)

# pytest exit code 5 (no tests collected) is not a failure of the suite. The CPU suite runs in TEST_WORKERS pytest
# processes (pytest-xdist, whole files per process so module fixtures are built once), each on one thread: the
# subprocesses the tests launch are one thread each too, so the cores are shared without oversubscription.
TEST_WORKERS ?= 2
PYTEST_CPU := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(BIN)/ruff check evaclip data_tools tests
	$(PYTEST_CPU) -m "not gpu" --durations=25; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-fast: $(STAMP)
	$(PYTEST_CPU) -m "not slow and not gpu"; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q tests -m gpu; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(STAMP)
	$(BIN)/python -m evaclip.bench all --out bench_results

# The wheels a CUDA node with a preinstalled torch lacks for evaclip, its tests and gpu-check (run `make wheelhouse`
# where the package index is reachable; the folder travels with the checkout). The node this is sized for (issue 22):
# Python 3.12, torch 2.11 cu130, torchvision, timm, safetensors, numpy, pillow, pyyaml, tensorboard, onnx, pytest,
# scikit-learn, matplotlib, pyarrow, huggingface-hub, regex, tqdm already installed. One exact version of each (pip
# refuses two), dependencies named explicitly (--no-deps): 2.8 MB. FlashAttention-4 does not fit the 60 MB budget
# (nvidia-cutlass-dsl's CUDA 13 libraries alone are 92 MB): SDPA only, unless FLASH=1 adds it (~105 MB in all).
# Not carried: clip-benchmark (one slow CPU test; pycocoevalcap is 101 MB) and wandb (no network there anyway).
# what the sized-for node already has, of what evaclip, its tests and gpu-check import (tests/test_cuda_paths.py checks
# that every requirement is here or in WHEELHOUSE, and that WHEELHOUSE's own requirements are too)
GPU_NODE_HAS := torch torchvision timm safetensors numpy pillow pyyaml tensorboard onnx onnxruntime onnxscript pytest \
               pytest-timeout scikit-learn matplotlib pyarrow huggingface-hub regex tqdm
WHEELS      ?= .whl
WHEEL_PY    ?= 3.12
WHEELHOUSE  := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5 torch-optimizer==0.3.0 pytorch-ranger==0.1.1 \
               webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0
FA4         := flash-attn-4==4.0.0b36
FA4_WHEELS  := $(FA4) nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
               nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 \
               torch-c-dlpack-ext==0.1.5
PLATFORMS   := --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
               --platform manylinux2014_x86_64

wheelhouse:
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(WHEEL_PY) --implementation cp \
	  $(PLATFORMS) -d $(WHEELS) $(WHEELHOUSE) $(if $(FLASH),$(FA4_WHEELS))
	@ls -l $(WHEELS)/*.whl | awk '{ printf "%10.2f MB  %s\n", $$5 / 1e6, $$9 }'
	@du -cb $(WHEELS)/*.whl | tail -1 | awk -v flash="$(FLASH)" '{ mb = $$1 / 1e6; \
	  printf "wheelhouse: %.1f MB in $(WHEELS) (budget 60 MB)%s\n", mb, flash ? ", FlashAttention-4 included" : \
	  ", SDPA only (FlashAttention-4 does not fit: make wheelhouse FLASH=1 adds it)"; \
	  if (mb >= 60 && !flash) exit 1 }'

# On a CUDA machine (about 5-8 minutes on one H100), with or without network: the first Python whose torch sees the GPU
# among .venv, GPU_VENV and GPU_PY (evaclip/cuda_env.py; each refusal says why: a CPU-only torch, a driver too old for
# torch's CUDA, no device). Any Python but .venv's gets GPU_VENV over it (gpu-venv below: its torch is used, never
# reinstalled; the rest from the wheelhouse with --no-index when WHEELS holds one, else from the index). Then the
# flash kernel this GPU runs, wheels only (never an hour-long FA2 compile): FlashAttention-4 at compute capability
# >= 9.0 (from the wheelhouse, or the index; cu13 libraries for a CUDA 13 torch), FA2 on 8.x where a wheel exists,
# else SDPA; then the CUDA tests and one benchmark report, bench_results/gpu-check.md (B/16, bf16, token drop 0 and
# 0.5, flash_attn and sdpa, vs open_clip, batch GPU_BATCH per GPU), written section by section.
GPU_BATCH ?= 128
GPU_PY    ?= python3
GPU_VENV  ?= .venv-gpu
gpu-check:
	@py=; for p in $(BIN)/python $(GPU_VENV)/bin/python $(GPU_PY); do \
	  command -v $$p >/dev/null 2>&1 || continue; \
	  $$p -c "import torch" 2>/dev/null || { echo "gpu-check: $$p: torch is not installed" >&2; continue; }; \
	  if $$p evaclip/cuda_env.py >/dev/null; then py=$$p; break; fi; done; \
	if [ -z "$$py" ]; then echo "gpu-check: no Python here has a torch that sees a GPU (reasons above)"; exit 1; fi; \
	if [ "$$py" != "$(BIN)/python" ]; then \
	  $(MAKE) --no-print-directory gpu-venv GPU_PY=$$py || exit 1; py=$(GPU_VENV)/bin/python; fi; \
	cap=$$($$py evaclip/cuda_env.py); \
	if [ "$$cap" -ge 90 ]; then \
	  if $$py -c "import flash_attn.cute" 2>/dev/null; then echo "gpu-check: FlashAttention-4 already installed"; \
	  elif [ -n "$$(ls $(WHEELS)/flash_attn_4-*.whl 2>/dev/null)" ]; then \
	    $$py -m pip install -q --no-index --no-deps $(WHEELS)/*.whl || echo "gpu-check: FA4 wheels did not install: SDPA only"; \
	  else extra=$$($$py -c "import torch; print('[cu13]' if (torch.version.cuda or '').startswith('13') else '')"); \
	    $$py -m pip install -q --only-binary=:all: --timeout 10 --retries 0 "$(subst ==,$$extra==,$(FA4))" \
	      || echo "gpu-check: no FA4 wheels here (not in $(WHEELS), no index): SDPA only"; fi; \
	elif [ "$$cap" -ge 80 ]; then \
	  $$py -m pip install -q --only-binary=:all: --timeout 10 --retries 0 "flash-attn>=2.6" \
	    || echo "gpu-check: no FA2 wheel for this torch / CUDA: SDPA only"; \
	else echo "gpu-check: compute capability $$cap: flash-attn needs >= 8.0, SDPA only"; fi; \
	export PYTHONPATH=$(CURDIR); \
	$$py -m pytest -q tests -m gpu -p no:cacheprovider; rc=$$?; [ $$rc -eq 5 ] && rc=0; \
	$$py -m evaclip.bench gpu-check --out bench_results --batch $(GPU_BATCH) || rc=1; exit $$rc

# GPU_VENV over GPU_PY: that Python's packages, torch included, are used as they are (--system-site-packages), and
# what evaclip needs beyond them comes from the wheelhouse with --no-index (from the index when WHEELS holds no wheel).
# --without-pip: the system's pip installs into the venv (a venv's own pip would bring, before Python 3.12, an old
# setuptools that shadows the system's and breaks torch's requirement on it). When GPU_PY is itself a venv (the GPU
# image's python3 is /opt/torch/.venv/bin/python3), --system-site-packages would reach only the interpreter beneath
# it: gpu_py_site.pth adds GPU_PY's own site-packages, after the new venv's, so torch is found there.
gpu-venv:
	test -x $(GPU_VENV)/bin/python || { $(GPU_PY) -m venv --system-site-packages --without-pip $(GPU_VENV) && \
	  $(GPU_PY) -c "import site, sys; print(*(site.getsitepackages() if sys.prefix != sys.base_prefix else []), sep='\n')" \
	  > "$$($(GPU_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/gpu_py_site.pth"; }
	@src="--find-links $(WHEELS)"; [ -n "$$(ls $(WHEELS)/*.whl 2>/dev/null)" ] && src="--no-index $$src"; \
	echo "gpu-venv: $(GPU_VENV) over $(GPU_PY) (torch $$($(GPU_VENV)/bin/python -c 'import torch; print(torch.__version__)'))," \
	  "pip install $$src"; \
	$(GPU_VENV)/bin/python -m pip install -q $$src $(WHEELHOUSE)

lint: $(STAMP)
	$(BIN)/ruff check evaclip data_tools tests

clean:
	rm -rf $(VENV) $(GPU_VENV) $(DEMO) runs bench_results .pytest_cache
