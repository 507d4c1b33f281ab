PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo lint format test test-models zoo zoo-transformers zoo-smp zoo-ultralytics bench clean

# One idempotent set-up for every target: a venv with jaxbn (editable) and its torch, test, plot and lint extras.
setup: $(STAMP)

$(STAMP): pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt -e '.[torch,test,plot,lint]'
	touch $(STAMP)

# The main job: torchvision's mobilenet_v3_large (eps 1e-3, momentum 0.01) -> checkpoint ->
# jaxbn.port, checked layer by layer, and what flax.linen.BatchNorm would get wrong.
demo: $(STAMP)
	$(VENV)/bin/jaxbn check --model torchvision:mobilenet_v3_large --train-steps 1 --plot drift.png

# Form and architecture: pyink, ruff, and the import-linter contracts in pyproject.toml (the layers).
lint: $(STAMP)
	$(VENV)/bin/pyink --check --quiet .
	$(VENV)/bin/ruff check --quiet .
	$(VENV)/bin/lint-imports --no-logo

# Rewrites the code into the form lint checks.
format: $(STAMP)
	$(VENV)/bin/pyink --quiet .
	$(VENV)/bin/ruff check --quiet --fix .

# Two workers (this machine's cores): the suite is mostly single-threaded XLA compilation. Each
# test file stays in one worker (--dist loadfile), as it ran before.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile

# The whole zoo: every torchvision ResNet and every model jaxbn.port is proven on, not only CI's,
# through the port and through jaxbn.emit's source (Linen and NNX).
test-models: $(STAMP)
	$(PY) -m pytest -m full_models parity_tests/test_resnet_parity.py parity_tests/test_port_models.py parity_tests/test_autocast.py parity_tests/test_emit.py

# The port's coverage: the smallest BatchNorm model of every timm architecture module and every
# torchvision BatchNorm model through the parity harness, one process each (hours on 2 cores;
# `--zoo timm` alone took 45 minutes; `--families` runs torchvision's smallest of each module).
zoo: $(STAMP)
	cd benchmarks && ../$(PY) zoo_sweep.py --out zoo-cpu.md

# Every Hugging Face transformers vision model class with BatchNorm (the sweep extra, installed here).
zoo-transformers: $(STAMP)
	$(PY) -m pip install --quiet -e '.[sweep]'
	cd benchmarks && ../$(PY) zoo_sweep.py --zoo transformers --out zoo-transformers-cpu.md

# segmentation_models_pytorch: every decoder (resnet18 encoder) and each of its encoder families under Unet.
zoo-smp: $(STAMP)
	$(PY) -m pip install --quiet -e '.[sweep]'
	cd benchmarks && ../$(PY) zoo_sweep.py --zoo smp --out zoo-smp-cpu.md

# ultralytics: every model yaml it ships at the n scale. Its requirements pull GPU and GUI packages
# the sweep never uses: installed without them, with what it imports.
zoo-ultralytics: $(STAMP)
	$(PY) -m pip install --quiet --no-deps ultralytics
	$(PY) -m pip install --quiet opencv-python-headless pyyaml psutil polars ultralytics-thop requests scipy
	cd benchmarks && ../$(PY) zoo_sweep.py --zoo ultralytics --out zoo-ultralytics-cpu.md

# The benchmark tables the README quotes (a few minutes on 2 cores; run on an idle machine).
bench: $(STAMP)
	cd benchmarks && ../$(PY) batchnorm_bench.py --out results-cpu.md
	cd benchmarks && ../$(PY) resnet_step.py --out results-resnet-cpu.md
	cd benchmarks && ../$(PY) resnet_step.py --models resnet18 --port --autocast --no-compile --out results-autocast-cpu.md

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .grimp_cache .ruff_cache drift.png
