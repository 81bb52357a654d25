# The README's commands. Each one sets up .venv first (only when pyproject.toml changed).
#   make pipeline   set up, then run the whole DVC pipeline (dvc repro)
#   make test       set up, then run the test suite
#   make test-fast  set up, then run the tests not marked slow (no end-to-end, Prefect,
#                   torchrun, browser or compile tests)
#   make lint       ruff, then mypy on llmcore/, stages/ and pipeline/
#   make speedrun   quality per minute against the peer (benchmarks/speedrun.py)
#   make plots      dvc plots show, rendered to reports/plots/index.html (works offline)
#   make showcase   the README's results and samples and the chat page's picture, regenerated
#                   from the default run (runs what is stale first)
#   make scaling    the scaling study (benchmarks/scaling.py: isoFLOP curves, hours on 2 cores)
#   make compare    experiments side by side; VARIANT='key=value' SEEDS=5: with significance
#   make harness    the held-out tasks in lm-evaluation-harness, on the exported model
#   make team-up HOST=ADDR   the team hub on this host (docs/teams.md); make team-down stops it
#   make team-worker CHECKOUT=DIR ENV=client.env   a training host serving the team's pool
#   make team-test  the team stack across three network namespaces (root; ~10 minutes)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmcore-installed
# Torch: a CPU build where no NVIDIA GPU is visible (no multi-GB CUDA download), the default
# (CUDA) build otherwise. Override with e.g. `make TORCH_SPEC='torch==2.13.0' setup`.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
export PATH := $(abspath $(BIN)):$(PATH)
export DO_NOT_TRACK := true
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := true

LLAMA_CPP_SPEC ?= llama-cpp-python==0.3.36
# llama.cpp is built for the CPU it runs on (GGML_NATIVE: its AVX-512 / AMX kernels where the
# CPU has them), so the wheel cache is kept per CPU: its model name and flags, hashed
CPU_TAG := $(shell { grep -m1 '^model name' /proc/cpuinfo; grep -m1 '^flags' /proc/cpuinfo; } 2>/dev/null | md5sum | cut -c1-12)
WHEEL_CACHE ?= $(HOME)/.cache/llmcore/wheels/$(CPU_TAG)

PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
PREFECT_ENV := PREFECT_HOME=$(abspath .prefect) \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	PREFECT_SERVER_ANALYTICS_ENABLED=false
# columns that change on every run (timings, throughput): hidden in `make compare`
VOLATILE := .*(seconds|per_s|mfu|memory|speed|resumed).*

.PHONY: team-setup team-up team-down team-worker team-test setup pipeline test test-fast lint bench speedrun showcase scaling plots llama-cpp clean-venv prefect-server serve mlflow-ui compare harness

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "setup: NVIDIA GPU found, installing the default (CUDA) torch build"; \
	  $(BIN)/python -m pip install -q '$(TORCH_SPEC)'; \
	else \
	  echo "setup: no NVIDIA GPU, installing the CPU build of torch"; \
	  $(BIN)/python -m pip install -q --retries 1 '$(TORCH_SPEC)' \
	    --extra-index-url $(TORCH_CPU_INDEX) 2>&1 | grep -v -e '^WARNING: Location' -e 'Retrying' ; \
	  $(BIN)/python -W ignore -c 'import torch' || { echo "setup: torch failed to install"; exit 1; }; \
	fi
	@# the rest with uv (its parallel downloads and installs take ~1/5 of pip's time); pip
	@# where uv cannot be had. torch, installed above, already satisfies the project's pin.
	@# --compile-bytecode: uv writes no .pyc by default, and where PYTHONDONTWRITEBYTECODE is
	@# set nothing writes them later, so every stage, dvc and mlflow process would compile
	@# mlflow, pandas, dvc... from source again (~3 s of each stage's start, measured)
	@{ $(BIN)/python -m pip install -q uv 2>&1 | grep -v '^WARNING: Location'; \
	  $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]'; } \
	  || $(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c 'import llmcore, torch, dvc, mlflow, prefect, tokenizers' \
	  || { echo "setup: installing the project failed"; exit 1; }
	@if ls $(WHEEL_CACHE)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q --no-deps $(WHEEL_CACHE)/llama_cpp_python-*.whl diskcache; fi
	@$(BIN)/python -m llmcore.report.plots --configure >/dev/null \
	  || echo "setup: charting scripts not fetched; make plots will try again"
	@touch $(STAMP)

pipeline: setup
	$(BIN)/dvc repro

# --durations: the slowest tests are named at the end (make test is kept under 15 minutes)
test: setup
	$(BIN)/python -m pytest -q --durations=20

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/pack.py

# every number and reply the README and docs show comes from the run, never typed by hand
showcase: setup
	$(BIN)/dvc repro
	$(BIN)/python docs/results.py
	$(BIN)/python docs/screenshot.py data/models/rl

scaling: setup
	$(BIN)/dvc repro fetch
	$(BIN)/python benchmarks/scaling.py

# llmcore's recipe against HF Llama + AdamW, same data, shape and wall-clock budget (per side)
SPEEDRUN_SECONDS ?= 240  # about the default pretrain stage's own training time
speedrun: setup
	$(BIN)/dvc repro pack
	$(BIN)/python benchmarks/speedrun.py --seconds $(SPEEDRUN_SECONDS)

# the stages' curves and charts as one HTML page, charting scripts inlined (no CDN)
plots: setup
	$(BIN)/python -m llmcore.report.plots --out reports/plots

# llama.cpp's Python binding, built from source once per CPU (minutes) into a wheel cache
# outside the repository, native to this CPU (a speed baseline must be); setup installs a
# cached wheel, the GGUF round-trip tests and benchmarks/decode_speed.py use it
llama-cpp: setup
	@ls $(WHEEL_CACHE)/llama_cpp_python-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_SERVER=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
	  $(BIN)/python -m pip wheel --no-deps '$(LLAMA_CPP_SPEC)' -w $(WHEEL_CACHE)
	$(BIN)/python -m pip install -q --no-deps $(WHEEL_CACHE)/llama_cpp_python-*.whl diskcache

clean-venv:
	rm -rf $(VENV)

# Orchestration (each in its own terminal): a local Prefect server, the served deployment,
# and the MLflow UI, all on 127.0.0.1 with their state inside the repository.
prefect-server: setup
	$(PREFECT_ENV) $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

serve: setup
	$(PREFECT_ENV) $(BIN)/python -m pipeline.flow serve

mlflow-ui: setup
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath mlflow.db) \
	  --default-artifact-root $(abspath mlartifacts) --host 127.0.0.1 --port $(MLFLOW_PORT)

# experiments side by side: only the params and metrics that differ, without timings. With
# VARIANT='key=value ...': the committed params against the variant over SEEDS seeds, queued
# as DVC experiments, with intervals and Welch p-values (python -m pipeline.compare --help)
SEEDS ?= 5
PROFILE ?= quick
compare: setup
ifdef VARIANT
	$(BIN)/python -m pipeline.compare --variant '$(VARIANT)' --seeds $(SEEDS) --profile $(PROFILE)
else
	$(BIN)/dvc exp show --only-changed --md --drop '$(VOLATILE)'
endif

# the evaluate stage's examples in lm-evaluation-harness, on the Hugging Face export
harness: setup
	$(BIN)/dvc repro evaluate
	$(BIN)/python benchmarks/harness.py

# Team mode (docs/teams.md): PostgreSQL and sshd from the system's packages (installed here
# when root on Debian), the `team` extra into the venv. `make pipeline` and `make test` need
# none of it.
TEAM_STATE ?=
TEAM_STATE_ARG := $(if $(TEAM_STATE),--state $(TEAM_STATE),)
team-setup: setup
	@missing=""; [ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "team-setup: installing$$missing"; \
	      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } \
	        >/tmp/llmcore-team-apt.log 2>&1 || { echo "team-setup: apt-get failed (/tmp/llmcore-team-apt.log)"; exit 1; }; \
	    else echo "team-setup: install$$missing (as root: apt-get install$$missing)"; exit 1; fi; \
	  fi
	@$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev,team]' \
	  || $(BIN)/python -m pip install -q -e '.[dev,team]'

team-up: team-setup
	@test -n "$(HOST)" || { echo "team-up: name the address the other hosts reach this one at: make team-up HOST=10.0.0.5"; exit 2; }
	$(BIN)/python -m pipeline.team $(TEAM_STATE_ARG) up --host $(HOST)

team-down: setup
	$(BIN)/python -m pipeline.team $(TEAM_STATE_ARG) down

team-worker: team-setup
	@test -n "$(CHECKOUT)" -a -n "$(ENV)" || { echo "team-worker: make team-worker CHECKOUT=DIR ENV=path/to/client.env [KEY=~/.ssh/id_ed25519]"; exit 2; }
	$(BIN)/python -m pipeline.team worker --checkout $(CHECKOUT) --env $(ENV) $(if $(KEY),--key $(KEY),)

# the three-namespace test (tests/team/test_team.py): root, ~10 minutes; its phases' seconds
# in reports/team_test.json
team-test: team-setup
	LLMCORE_TEAM_TEST=1 LLMCORE_TEAM_REPORT=reports/team_test.json $(BIN)/python -m pytest -q -p no:cacheprovider tests/team
