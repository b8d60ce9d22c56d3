# Common commands. `make test` is what CI runs; `make demo` runs the main job.
# Both first create the virtual environment $(VENV) and install mcd_jax into it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
MCD_DATA_DIR ?= $(abspath ../shared/data)
export MCD_DATA_DIR
WORKDIR ?= workdirs/demo
INSTALLED := $(VENV)/.installed

.PHONY: install test test-fast demo smoke bench

install: $(INSTALLED)

$(INSTALLED): setup.py
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install -e ".[test]"
	touch $(INSTALLED)

# The whole suite; under 15 minutes on 2 CPU cores.
test: $(INSTALLED)
	@$(PYTHON) -m pytest -q -n 2 --dist loadfile tests; status=$$?; \
	  if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; \
	  exit $$status

# Everything except the slow end-to-end runs.
test-fast: $(INSTALLED)
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# The main job on the default corpus: teacher, MCD and SDTT students, AR
# evaluator, then the quality-speed table. It took 47 minutes alone on 2 CPU
# cores (docs/results.md, section 3).
demo: $(INSTALLED)
	$(PYTHON) -m mcd_jax.main --config configs/mcd_bible_char.py --workdir $(WORKDIR) --mode pipeline

smoke: $(INSTALLED)
	$(PYTHON) -m mcd_jax.main --config configs/mcd_bible_char.py:smoke --workdir workdirs/smoke --mode pipeline

bench: $(INSTALLED)
	$(PYTHON) benchmarks/duality_cost.py
	$(PYTHON) benchmarks/sampler_speed.py
	$(PYTHON) benchmarks/trainer_speed.py
	$(PYTHON) benchmarks/ar_baseline.py
	$(PYTHON) benchmarks/exact_trained.py
