# Common commands. `make test` is what CI runs; `make demo` runs the main job.
PYTHON ?= python
MCD_DATA_DIR ?= $(abspath ../shared/data)
export MCD_DATA_DIR
WORKDIR ?= workdirs/demo

.PHONY: install test test-fast demo smoke bench lint

install:
	$(PYTHON) -m pip install -e ".[test]"

# The whole suite; under 15 minutes on 2 CPU cores.
test:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

# Everything except the slow end-to-end runs.
test-fast:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

# The main job on the default corpus: teacher, AR evaluator, MCD and SDTT
# students, then the quality-speed table (about 30 minutes on 2 CPU cores).
demo:
	$(PYTHON) -m mcd_jax.main --config configs/mcd_bible_char.py --workdir $(WORKDIR) --mode pipeline

smoke:
	$(PYTHON) -m mcd_jax.main --config configs/mcd_bible_char.py:smoke --workdir workdirs/smoke --mode pipeline

bench:
	$(PYTHON) benchmarks/duality_cost.py
	$(PYTHON) benchmarks/sampler_speed.py
	$(PYTHON) benchmarks/trainer_speed.py
