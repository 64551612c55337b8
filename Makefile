# edgesr front door. `make help` lists the targets; `make demo` and `make test` set up on first run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BIN ?= python3.11
VENV := .venv
DEVICE_VENV := .venv-device
PY := $(VENV)/bin/python
DEVICE_PY := $(DEVICE_VENV)/bin/python
PIP_FLAGS := --disable-pip-version-check -q

# Knobs (override on the command line, e.g. `make compress METHOD=iks TARGET=0.85`).
METHOD ?= magnitude
TARGET ?= 0.8
SPARSITY ?= $(TARGET)
STEPS ?= 1000
PARAMS ?= 0.5
WEIGHT_SPARSITY ?= 0.3
COMPRESS_ARGS ?=
CHANNEL_METHODS := fmp channel-only channel-l1
# The target flags each method takes: --sparsity (magnitude, iks), --params [--weight-sparsity] (channel methods).
TARGET_FLAGS = $(if $(filter $(METHOD),$(CHANNEL_METHODS)),--params $(PARAMS) \
	$(if $(filter fmp,$(METHOD)),--weight-sparsity $(WEIGHT_SPARSITY),),--sparsity $(SPARSITY))
CKPT ?= checkpoints/edsr-tiny-x2/model.pt
# A model of your own instead of CKPT: MODEL=nets/sr.py:build [WEIGHTS=sr.pth] [FACTORY_ARGS='{"scale": 2}'].
MODEL ?=
WEIGHTS ?=
FACTORY_ARGS ?=
MODEL_FLAGS = --model $(MODEL) $(if $(WEIGHTS),--weights $(WEIGHTS),) $(if $(FACTORY_ARGS),--factory-args '$(FACTORY_ARGS)',)
OUT ?= runs/latest
FORMATS ?= tflite,coreml
PRECISION ?= fp32
TILE ?= 128
FRAME ?=
ARTIFACTS ?= $(OUT)/convert
BUDGETS ?=
TARGETS ?= local
TARGETS_FILE ?=
TEST_SET ?= sporco
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help setup system-tools demo test test-vm test-all lint compress bench-prune convert bench fit report clean

help: ## list the targets
	@echo "edgesr make targets:"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-12s %s\n", $$1, $$2}'
	@echo "knobs: METHOD TARGET (=SPARSITY) PARAMS WEIGHT_SPARSITY STEPS COMPRESS_ARGS CKPT MODEL WEIGHTS FACTORY_ARGS"
	@echo "       OUT FORMATS PRECISION TILE (a side, a list or frame) FRAME (WxH)"
	@echo "       ARTIFACTS BUDGETS TARGETS TARGETS_FILE TEST_SET FIT_BUDGETS FIT_ARGS"
	@echo "       PYTEST_ARGS BENCH_ARGS (see README)"

setup: $(VENV)/.ok $(DEVICE_VENV)/.ok ## build the venvs (.venv, .venv-device) and fetch the pretrained weights
	@# Once (34 MB from the npm registry, sha256-pinned) into $${EDGESR_CACHE:-~/.cache/edgesr}; cached: a checksum.
	@$(PY) -m compress.pretrained fetch

# The device harness tests drive real ssh/sshd and a real adb server; as root, install them when missing.
SYSTEM_TOOLS := /usr/bin/ssh /usr/sbin/sshd /usr/bin/adb
system-tools: ## install ssh, sshd and adb from Debian when missing (root; the harness tests need them)
	@missing=""; for f in $(SYSTEM_TOOLS); do [ -x $$f ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "missing:$$missing; run: sudo apt-get install openssh-client openssh-server adb" >&2; exit 2; fi; \
		echo "installing openssh-client openssh-server adb (missing:$$missing)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			openssh-client openssh-server adb >/dev/null; \
	fi

$(VENV)/.ok: constraints.txt pyproject.toml
	@echo "setting up $(VENV) (torch 2.13.0 CPU, litert-torch, coremltools, tensorflow-cpu; a few minutes, ~3.6 GB)"
	$(PYTHON_BIN) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt -e '.[dev]'
	@# sporco only ships the test photos we read; its numerical deps (pyfftw, ...) are not needed.
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps sporco==0.2.2.post1
	touch $@

$(DEVICE_VENV)/.ok:
	@echo "setting up $(DEVICE_VENV): what a device has (ai-edge-litert + numpy; coremltools as on a Mac; no torch)"
	$(PYTHON_BIN) -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/pip install $(PIP_FLAGS) -c constraints.txt ai-edge-litert==2.3.0 numpy==2.4.6 coremltools==9.0
	touch $@

DEMO_FRAME ?= 960x540
DEMO_TILES ?= 128,256,frame
demo: setup ## prune the shipped x2 model two ways, convert for a tile sweep at a 960x540 frame, bench locally, report
	$(PY) -m compress prune --checkpoint checkpoints/edsr-tiny-x2/model.pt --sparsity 0.8 --steps 1200 \
		--out runs/demo/pruned
	$(PY) -m compress prune --checkpoint checkpoints/edsr-tiny-x2/model.pt --method channel-l1 --params 0.5 \
		--steps 600 --out runs/demo/pruned-channels
	rm -rf runs/demo/convert runs/demo/convert-unpruned runs/demo/convert-channels runs/demo/convert-coreml
	$(PY) -m convert --checkpoint checkpoints/edsr-tiny-x2/model.pt --formats tflite \
		--tile $(DEMO_TILES) --frame $(DEMO_FRAME) --name edsr-tiny-x2 --out runs/demo/convert-unpruned
	$(PY) -m convert --checkpoint runs/demo/pruned/model.pt --formats tflite \
		--tile $(DEMO_TILES) --frame $(DEMO_FRAME) --name edsr-tiny-x2-sparse80 --out runs/demo/convert
	$(PY) -m convert --checkpoint runs/demo/pruned-channels/model.pt --formats tflite \
		--tile $(DEMO_TILES) --frame $(DEMO_FRAME) --name edsr-tiny-x2-channels50 --out runs/demo/convert-channels
	$(PY) -m convert --checkpoint runs/demo/pruned/model.pt --formats coreml --tile $(TILE) \
		--name edsr-tiny-x2-sparse80 --out runs/demo/convert-coreml
	$(PY) -m device_bench bench runs/demo/convert-unpruned runs/demo/convert runs/demo/convert-channels \
		--frame $(DEMO_FRAME) --tile $(DEMO_TILES) --targets local --runs 5 --budgets configs/demo-budgets.yaml \
		--out runs/demo
	@echo "demo done: runs/demo/report.md (tables, plots), report.json, results.jsonl; Core ML files in runs/demo/convert-coreml"

test: setup system-tools ## run the default test suite (fast; excludes slow and vm tests)
	$(PY) -m pytest $(PYTEST_ARGS)

test-vm: setup system-tools pi-vm ## run the tests marked vm against the arm64 stand-in (boots it; builds it once)
	$(PY) -m pytest -m vm $(PYTEST_ARGS)

test-all: setup system-tools ## run every test, slow ones included (not the vm ones: make test-vm)
	$(PY) -m pytest -m "not vm" $(PYTEST_ARGS)

lint: setup ## ruff format check and lint
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

compress: setup ## prune CKPT with METHOD to TARGET sparsity (magnitude|iks) or PARAMS (fmp|channel-*), into OUT/pruned
	$(PY) -m compress prune $(if $(MODEL),$(MODEL_FLAGS),--checkpoint $(CKPT)) --method $(METHOD) $(TARGET_FLAGS) --steps $(STEPS) \
		--test-set $(TEST_SET) --out $(OUT)/pruned $(COMPRESS_ARGS)

bench-prune: setup ## print PSNR and step time of dense, magnitude and IKS at 50/80/90% (a benchmark, ~30 min)
	$(PY) benchmarks/prune_tradeoff.py --checkpoint $(CKPT) --steps $(STEPS) --jobs 2 --out $(OUT)/bench-prune $(BENCH_ARGS)

# CKPT given (command line or environment) wins; left at its default, OUT/pruned/model.pt is used if it exists.
# TILE is passed only when given, so a .pt2 exported with a static input keeps its own size.
CONVERT_CKPT = $(if $(filter file,$(origin CKPT)),$(or $(wildcard $(OUT)/pruned/model.pt),$(CKPT)),$(CKPT))
convert: setup ## convert CKPT (.pt or .pt2; default OUT/pruned/model.pt if it exists) to FORMATS x PRECISION, into OUT/convert
	@mkdir -p $(OUT)
	$(PY) -m convert $(if $(MODEL),$(MODEL_FLAGS),--checkpoint $(CONVERT_CKPT)) --formats $(FORMATS) --precision $(PRECISION) \
		$(if $(filter file,$(origin TILE)),,--tile $(TILE)) $(if $(FRAME),--frame $(FRAME),) --out $(OUT)/convert

bench: setup ## bench ARTIFACTS on TARGETS against BUDGETS, report into OUT
	$(PY) -m device_bench bench $(ARTIFACTS) --targets $(TARGETS) --test-set $(TEST_SET) \
		$(if $(FRAME),--frame $(FRAME),) $(if $(filter file,$(origin TILE)),,--tile $(TILE)) \
		$(if $(TARGETS_FILE),--targets-file $(TARGETS_FILE),) $(if $(BUDGETS),--budgets $(BUDGETS),) --out $(OUT)

FIT_BUDGETS ?= configs/fit-budgets.yaml
FIT_ARGS ?=
fit: setup ## per target, the largest pruned artifact of CKPT (or MODEL) passing FIT_BUDGETS, measured there, into OUT/fit
	$(PY) -m fit $(if $(MODEL),$(MODEL_FLAGS),--checkpoint $(CKPT)) --budgets $(FIT_BUDGETS) --targets $(TARGETS) \
		$(if $(TARGETS_FILE),--targets-file $(TARGETS_FILE),) $(if $(FRAME),--frame $(FRAME),) \
		$(if $(filter file,$(origin TILE)),,--tile $(TILE)) $(if $(filter file,$(origin STEPS)),,--steps $(STEPS)) \
		--test-set $(TEST_SET) --out $(OUT)/fit $(FIT_ARGS)

report: setup ## re-render OUT/report.md and the plot from OUT/report.json
	$(PY) -m device_bench report $(OUT)

clean: ## remove runs/ and caches (keeps the venvs; `rm -rf .venv .venv-device` for those)
	rm -rf runs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv*' -exec rm -rf {} +

.PHONY: pi-vm pi-vm-stop
pi-vm: ## build (once, ~4 min, root) and boot the arm64 Raspberry Pi stand-in VM; ssh on 127.0.0.1:2226, .pi/targets.yaml
	scripts/pi_vm.sh start

pi-vm-stop: ## power the arm64 stand-in VM off
	scripts/pi_vm.sh stop
