# Quickstart: `make demo` (the main job) and `make test` (the tests). Each creates what it needs:
# a venv in .venv with torch and the build tools, then the extension (incremental: build/).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch (pip takes it from the local wheel store here); CUDA kernels are compiled
# when nvcc is found (HALFVAE_CUDA=AUTO), else the build is CPU-only. ON / OFF force it.
TORCH_SPEC ?= torch==2.14.1
HALFVAE_CUDA ?= AUTO
# GPU architectures to compile for; 9.0 = H100/H200. Example: make TORCH_CUDA_ARCH_LIST="8.0;9.0"
TORCH_CUDA_ARCH_LIST ?= 9.0
export TORCH_CUDA_ARCH_LIST
DEPS := numpy scikit-build-core cmake ninja pytest hypothesis scipy scikit-learn tqdm matplotlib \
	python-picard jamica

SOURCES := $(shell find csrc -type f) CMakeLists.txt pyproject.toml $(VENV)/.py-files

.PHONY: all build test demo bench clean FORCE

all: build

# The dependency list, rewritten only when it changes, so that a venv made before a dependency
# was added gets it (pip skips what is already installed).
$(VENV)/.deps-list: FORCE
	@mkdir -p $(VENV)
	@echo '$(TORCH_SPEC) $(DEPS)' | cmp -s - $@ || echo '$(TORCH_SPEC) $(DEPS)' > $@

$(VENV)/.deps-installed: $(VENV)/.deps-list
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC) $(DEPS)
	touch $@

# The package's Python file names, rewritten only when a file is added, moved or removed: the
# editable install maps each module to its file, so such a change needs a reinstall.
$(VENV)/.py-files: FORCE
	@mkdir -p $(VENV)
	@find halfvae_ext -name '*.py' | sort | cmp -s - $@ || find halfvae_ext -name '*.py' | sort > $@

# The build settings, rewritten only when they change, so that `make HALFVAE_CUDA=ON` after a
# CPU-only build rebuilds instead of finding the stamp below up to date.
EXT_CONFIG := HALFVAE_CUDA=$(HALFVAE_CUDA) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST)
$(VENV)/.ext-config: FORCE | $(VENV)/.deps-installed
	@echo '$(EXT_CONFIG)' | cmp -s - $@ || echo '$(EXT_CONFIG)' > $@

# Rebuilds only what changed: scikit-build-core keeps the CMake/ninja tree in build/.
$(VENV)/.ext-built: $(VENV)/.deps-installed $(VENV)/.ext-config $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e . \
		-Ccmake.define.HALFVAE_CUDA=$(HALFVAE_CUDA) \
		-Ccmake.define.TORCH_CUDA_ARCH_LIST="$(TORCH_CUDA_ARCH_LIST)"
	touch $@

build: $(VENV)/.ext-built

test: build
	$(PY) -m pytest -q tests

# The main job: Half-VAE against a VAE, iVAE, FastICA, Picard and AMICA on the paper's problems,
# linear mixes of assorted sources, two photographs and nonstationary nonlinear ICA (3 seeds; about
# 6-9 minutes on 2 cores): table on stdout, results/demo/{results.json,sources_<problem>.png}.
demo: build
	$(PY) -m halfvae_ext.cli demo --out results/demo

# The fused op against what users would write, short sizes (a few minutes on 2 cores): table on
# stdout, results/bench/bench_ops.{json,png}. The suites live in benchmarks/, not in the wheel.
bench: build
	$(PY) -m benchmarks.bench_ops --quick

clean:
	rm -rf build $(VENV)/.ext-built
