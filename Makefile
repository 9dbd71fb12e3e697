#   make test             the test command (README, .ci/run): install, peers for the parity tests, pytest
#
# Benchmarks: tritondrr beside DiffDRR 0.6.1 and nanodrr, in one run, one command:
#
#   make bench            install the peers (torch kept as installed: constraints only), run the
#                         suite (profile full) into bench/results/<device-slug>.json, the accuracy
#                         into <slug>-accuracy.json, the pose gradients, and the report
#                         (bench/results/<slug>.md, .png and README.md's benchmark section)
#   make bench-quick      profile quick (heights 100 and 200, a 4 x 64x64 batch); results under .benchmarks/
#   make bench-peers      only the install;   make bench-run   only the run and the report
#   make bench-report     only the report, from every bench/results/<slug>.json
#   make bench-gradients  pose-gradient accuracy of every renderer against the exact gradient
#   make bench-skipping   every renderer with empty-space skipping on and off (bench/results/<slug>-skipping.*)
#   make bench-sass       SASS instructions per sample of every kernel, sm_90, no GPU needed
#                         (bench/results/sass-sm90.md and .json)
#   make bench-wheels     (machine with a registry) download the peers' wheels into .peers/
#   make bench-offline    (the GPU machine, no registry; carry .peers) install them from .peers/
#                         into a temporary folder, then run the suite and the report
#   make gpu-prepare      bench-wheels, and .peers/REVISION (the commit the GPU run measures)
#   make gpu-dry-run      the GPU run rehearsed on CPU (bench/gpu_check.sh --dry-run) into .benchmarks/gpu-dry-run
#   make gpu-ingest FILES=dir   the GPU run's returned files -> bench/results/cuda-<device>.* and the report
#
# Variables: PYTHON (default python3), DEVICE (cpu or cuda; default cuda when available),
# PROFILE (quick, full, gpu; default full), SHARED (the shared folder beside the repository:
# ./shared or ../shared), PYTEST_ARGS (extra pytest arguments, e.g.
# PYTEST_ARGS='-k "tritondrr and forward"').

SHELL := /bin/bash
PYTHON ?= python3
SHARED ?= $(firstword $(wildcard shared ../shared /work/shared))
DEVICE ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
SLUG = $(shell cd bench && $(PYTHON) -c "import torch, drrbench; print(drrbench.device_slug(torch.device('$(DEVICE)')))")
# torchio imports SimpleITK; the peers never call it, so a placeholder package stands in for it.
PEERS_PATH = PYTHONPATH="$(abspath $(SHARED))/peers$${PYTHONPATH:+:$$PYTHONPATH}"
PROFILE ?= full
PYTEST_BENCH = $(PEERS_PATH) $(PYTHON) -m pytest bench --bench-device $(DEVICE) \
	--benchmark-columns=median,min,max,rounds --benchmark-sort=name $(PYTEST_ARGS)
# torch as installed, never replaced: every install below is constrained to this version.
TORCH_VERSION = $(shell $(PYTHON) -c "import torch; print(torch.__version__)" 2>/dev/null)
TORCH_PIN = -c <(echo torch==$(TORCH_VERSION))
# The results files of bench/results (their companions -accuracy, -kernels, ... are read beside them).
RESULTS = $(filter-out %-accuracy.json %-kernels.json %-gradients.json %-gpu-check.json %-skipping.json %-quick.json %-generation.json %-generation-compiled.json %-generation-omp1.json bench/results/sass-% bench/results/registration-%,$(wildcard bench/results/*.json))

.PHONY: test bench bench-peers bench-run bench-quick bench-report bench-wheels bench-offline bench-gradients \
	bench-sass bench-skipping gpu-prepare gpu-dry-run gpu-ingest

bench: bench-peers bench-run

# The test command (README, .ci/run): the project with its test extra (torch pinned to the CPU
# build), then the peers for the DiffDRR/nanodrr parity tests without their dependency trees
# (optional: where no registry answers they are skipped, and so are those tests), then the suite.
test:
	$(PYTHON) -m pip install torch==2.13.0 -e ".[test]"
	-$(PYTHON) -m pip install -q --no-deps diffdrr==0.6.1 nanodrr==0.1.7 torchio SimpleITK roma platformdirs \
		fastcore humanize deprecated wrapt kornia kornia_rs imageio
	-$(PYTHON) -m pip install -q nibabel jaxtyping einops pandas rich typer tqdm scipy -c <(echo torch==2.13.0)
	$(PYTHON) -m pytest -q

bench-peers:
	@test -d "$(SHARED)/peers" || { echo "shared/peers not found (SHARED=$(SHARED)); set SHARED=path/to/shared"; exit 2; }
	@test -n "$(TORCH_VERSION)" || { echo "torch is not installed for $(PYTHON): install it first (make bench keeps it as it is)"; exit 2; }
	$(PYTHON) -m pip install --no-deps diffdrr==0.6.1 nanodrr torchio roma platformdirs fastcore humanize deprecated wrapt
	$(PYTHON) -m pip install nibabel jaxtyping einops pandas rich typer tqdm scipy $(TORCH_PIN)
	$(PYTHON) -m pip install -e ".[bench]" $(TORCH_PIN)
	$(PEERS_PATH) $(PYTHON) -c "import torch, diffdrr, nanodrr.drr; \
		assert torch.__version__ == '$(TORCH_VERSION)', torch.__version__; \
		print('peers ready: torch', torch.__version__, 'diffdrr', diffdrr.__version__)"

bench-run:
	@mkdir -p bench/results
	BENCH_PROFILE=$(PROFILE) $(PYTEST_BENCH) --benchmark-json=bench/results/$(SLUG).json
	BENCH_PROFILE=$(PROFILE) $(PEERS_PATH) $(PYTHON) bench/accuracy.py --device $(DEVICE)
	$(PEERS_PATH) $(PYTHON) bench/gradients.py --device $(DEVICE)
	$(PYTHON) bench/skipping.py --device $(DEVICE)
	$(PYTHON) bench/report.py bench/results/$(SLUG).json

bench-gradients:
	$(PEERS_PATH) $(PYTHON) bench/gradients.py --device $(DEVICE)

bench-skipping:
	$(PYTHON) bench/skipping.py --device $(DEVICE)

bench-quick:
	@mkdir -p .benchmarks
	BENCH_PROFILE=quick $(PYTEST_BENCH) --benchmark-json=.benchmarks/quick-$(SLUG).json
	BENCH_PROFILE=quick $(PEERS_PATH) $(PYTHON) bench/accuracy.py --device $(DEVICE) --json .benchmarks/quick-$(SLUG)-accuracy.json
	$(PYTHON) bench/report.py .benchmarks/quick-$(SLUG).json --no-readme --allow-dirty

bench-report:
	$(PYTHON) bench/report.py $(RESULTS)

bench-sass:
	$(PYTHON) bench/sass_count.py

gpu-prepare: bench-wheels
	{ git describe --always --dirty; git rev-parse HEAD; } > .peers/REVISION
	@cat .peers/REVISION
	@if grep -q -- -dirty .peers/REVISION; then echo "warning: dirty tree; bench/gpu_ingest.py will refuse the run (commit first)"; fi

gpu-dry-run:
	bench/gpu_check.sh --dry-run .benchmarks/gpu-dry-run

gpu-ingest:
	@test -n "$(FILES)" || { echo "usage: make gpu-ingest FILES=folder-of-returned-files"; exit 2; }
	$(PYTHON) bench/gpu_ingest.py $(FILES)

bench-wheels:
	$(SHARED)/peers/gpu-wheels.sh .peers

bench-offline:
	@test -d .peers || { echo ".peers/ not found: run make bench-wheels where a registry is reachable, carry .peers"; exit 2; }
	s=$$(mktemp -d) && $(PYTHON) -m pip install -q --no-index --no-deps --no-compile --target "$$s" .peers/*.whl \
	  && $(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e . \
	  && $(MAKE) bench-run PEERS_PATH='PYTHONPATH="'"$$s:$$PWD/.peers/stub"'"'
