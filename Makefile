# Benchmarks: tritondrr beside DiffDRR 0.6.1 and nanodrr, in one run, one command:
#
#   make bench            install the peers (pinned torch, as shared/peers/README.md says), run the
#                         whole suite into bench/results/<device-slug>.json, write the report
#                         (bench/results/<slug>.md, .png and README.md's benchmark section)
#   make bench-quick      heights 100 and 200 and a small batch only; results under .benchmarks/
#   make bench-peers      only the install;   make bench-run   only the run and the report
#   make bench-report     only the report, from every bench/results/*.json
#   make bench-gradients  pose-gradient accuracy of every renderer against the exact gradient
#   make bench-wheels     (machine with a registry) download the peers' wheels into .peers/
#   make bench-offline    (the GPU machine, no registry; carry .peers) install them from .peers/
#                         into a temporary folder, then run the suite and the report
#
# Variables: PYTHON (default python3), DEVICE (cpu or cuda; default cuda when available),
# SHARED (the shared folder beside the repository: ./shared or ../shared), PYTEST_ARGS (extra
# pytest arguments, e.g. PYTEST_ARGS='-k "tritondrr and forward"').

SHELL := /bin/bash
PYTHON ?= python3
SHARED ?= $(firstword $(wildcard shared ../shared /work/shared))
DEVICE ?= $(shell $(PYTHON) -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
SLUG = $(shell cd bench && $(PYTHON) -c "import torch, drrbench; print(drrbench.device_slug(torch.device('$(DEVICE)')))")
# torchio imports SimpleITK; the peers never call it, so a placeholder package stands in for it.
PEERS_PATH = PYTHONPATH="$(abspath $(SHARED))/peers$${PYTHONPATH:+:$$PYTHONPATH}"
PYTEST_BENCH = $(PEERS_PATH) $(PYTHON) -m pytest bench --bench-device $(DEVICE) \
	--benchmark-columns=median,min,max,rounds --benchmark-sort=name $(PYTEST_ARGS)

.PHONY: bench bench-peers bench-run bench-quick bench-report bench-wheels bench-offline bench-gradients

bench: bench-peers bench-run

bench-peers:
	@test -d "$(SHARED)/peers" || { echo "shared/peers not found (SHARED=$(SHARED)); set SHARED=path/to/shared"; exit 2; }
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install --no-deps diffdrr==0.6.1 nanodrr torchio roma platformdirs fastcore humanize deprecated wrapt
	$(PYTHON) -m pip install nibabel jaxtyping einops pandas rich typer tqdm scipy -c <(echo torch==2.13.0)
	$(PYTHON) -m pip install -e ".[bench]" -c <(echo torch==2.13.0)
	$(PEERS_PATH) $(PYTHON) -c "import torch, diffdrr, nanodrr.drr; \
		assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; \
		print('peers ready: torch', torch.__version__, 'diffdrr', diffdrr.__version__)"

bench-run:
	@mkdir -p bench/results
	$(PYTEST_BENCH) --benchmark-json=bench/results/$(SLUG).json
	$(PEERS_PATH) $(PYTHON) bench/gradients.py --device $(DEVICE)
	$(PYTHON) bench/report.py bench/results/$(SLUG).json

bench-gradients:
	$(PEERS_PATH) $(PYTHON) bench/gradients.py --device $(DEVICE)

bench-quick:
	@mkdir -p .benchmarks
	BENCH_QUICK=1 $(PYTEST_BENCH) --benchmark-json=.benchmarks/quick-$(SLUG).json
	$(PYTHON) bench/report.py .benchmarks/quick-$(SLUG).json --no-readme

bench-report:
	$(PYTHON) bench/report.py bench/results/*.json

bench-wheels:
	$(SHARED)/peers/gpu-wheels.sh .peers

bench-offline:
	@test -d .peers || { echo ".peers/ not found: run make bench-wheels where a registry is reachable, carry .peers"; exit 2; }
	s=$$(mktemp -d) && $(PYTHON) -m pip install -q --no-index --no-deps --no-compile --target "$$s" .peers/*.whl \
	  && $(PYTHON) -m pip install -q --no-deps --no-build-isolation --no-index -e . \
	  && $(MAKE) bench-run PEERS_PATH='PYTHONPATH="'"$$s:$$PWD/.peers/stub"'"'
