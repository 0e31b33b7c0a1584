# Two commands do all the setup: `make demo` and `make test`.
# Both go through `make install`, which is idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# `workbench plan --compiler h100` compiles for GPUs this machine does not have. JAX's
# CUDA plugin does that (no GPU, driver or CUDA libraries needed) but prints notices
# whenever JAX starts without a driver, so it lives in its own small environment, with
# the same jax, flax and optax as .venv.
GPU_PLAN_VENV := .venv-gpu-plan
GPU_PLAN_STAMP := $(GPU_PLAN_VENV)/.installed
# Xvfb + Mesa + Qt runtime libraries for napari tests; Chromium + driver for the notebook browser test.
DEBIAN_PKGS := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 \
	libxcb-xkb1 libdbus-1-3 libfontconfig1 chromium chromium-driver

.PHONY: install system-deps demo test test-quick lint format bench lab clean

install: $(STAMP) $(GPU_PLAN_STAMP)

system-deps:
	@missing=""; for p in $(DEBIAN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages$$missing (run as root or install them)"; fi; \
	fi

# PYTHONWARNINGS=ignore: setuptools' advisory about editable installs is not actionable here.
$(STAMP): pyproject.toml Makefile
	$(MAKE) system-deps
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e ".[test,viewer,notebook,bench]"
	$(BIN)/python -m ipykernel install --sys-prefix --name workbench --display-name "Python (workbench)" >/dev/null
	touch $(STAMP)

$(GPU_PLAN_STAMP): $(STAMP)
	test -x $(GPU_PLAN_VENV)/bin/python || $(PY) -m venv $(GPU_PLAN_VENV)
	set -e; set -- $$($(BIN)/python -c "import jax, flax, optax, numpy; \
	  print(jax.__version__, flax.__version__, optax.__version__, numpy.__version__)"); \
	$(GPU_PLAN_VENV)/bin/python -m pip install -q "jax==$$1" "jaxlib==$$1" "jax-cuda12-plugin==$$1" \
	  "flax==$$2" "optax==$$3" "numpy==$$4"
	touch $(GPU_PLAN_STAMP)

# Without a display, the demo's napari screenshot is taken on a virtual one.
XVFB := $(if $(DISPLAY),,xvfb-run -a -s "-screen 0 1280x1024x24")
demo: install
	$(XVFB) $(BIN)/workbench demo --out demo_out --overwrite

# napari tests need a real (virtual) display: the whole suite runs under xvfb-run.
# JAX's compilation cache (per checkout) spares recompiling the same programs across
# tests, notebooks and runs. Two pytest-xdist workers, a whole file each (module fixtures,
# the bad-input catalogue and each notebook stay in one process): a serial run leaves a
# core idle while XLA compiles on one thread. PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 2
PYTEST_XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)
TEST_ENV = JAX_COMPILATION_CACHE_DIR=$(CURDIR)/.cache/jax
# Extra pytest arguments, after the defaults (e.g. PYTEST_ARGS=--durations=0 for every test's time).
PYTEST_ARGS ?=
test: install lint
	$(TEST_ENV) xvfb-run -a -s "-screen 0 1280x1024x24" \
		$(BIN)/python -m pytest -q $(PYTEST_XDIST) --durations=20 $(PYTEST_ARGS)

# The development tier: unit and exactness tests without several processes or the slow
# planner compiles (a few minutes); `make test` and CI run everything.
QUICK_TIER = (unit or exactness) and not multiprocess and not slow
test-quick: install
	$(TEST_ENV) $(BIN)/python -m pytest -q $(PYTEST_XDIST) -m "$(QUICK_TIER)" tests

# ruff: lint and format check (configured in pyproject.toml); `make format` applies both.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# JupyterLab on the notebooks with the project's kernel ("Python (workbench)").
lab: install
	$(BIN)/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

bench: install
	$(BIN)/python benchmarks/partition_overhead.py

clean:
	rm -rf $(VENV) $(GPU_PLAN_VENV) demo_out .pytest_cache .cache
