# Every target builds (or reuses) .venv from this repository's own files, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo bench bench-dev bench-cohort bench-adapt bench-adapt-40 clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# Two test processes on the 2 cores CI has (many tests wait on one core: imports, subprocesses, simulation); one
# file at a time each, so a module's fixtures are made once. The slowest tests are listed, to watch CI's time.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 Testing

demo: $(STAMP)
	$(VENV)/bin/cmbdetector demo --out demo-output

bench: $(STAMP)
	$(VENV)/bin/cmbdetector bench --out bench-output --table docs/benchmark.md

# the same on the development sets (seeds 31 and 71), where changes are chosen: bench-dev/benchmark-dev.md
bench-dev: $(STAMP)
	$(VENV)/bin/cmbdetector bench --dev

# a detect loop against `batch` on 2 workers, and a dense U-Net, over 16 simulated SWI scans (docs/benchmark-cohort.md)
bench-cohort: $(STAMP)
	$(VENV)/bin/cmbdetector bench-cohort --out bench-output/cohort --n 16 --workers 2 --table docs/benchmark-cohort.md

# Fine-tuning on a simulated site's reviews, measured before and after (reuses bench-output/val when there)
bench-adapt: $(STAMP)
	$(VENV)/bin/cmbdetector bench-adapt --out bench-adapt-output --val bench-output/val --table docs/benchmark-adapt.md

# The same site after 40 reviewed scans (a second review set, seed 48): the learning curve's next point
bench-adapt-40: $(STAMP)
	$(VENV)/bin/cmbdetector bench-adapt --out bench-adapt-output --val bench-output/val \
		--table docs/benchmark-adapt-40.md --train-seed 41 48 --train-scans 40

clean:
	rm -rf $(VENV) demo-output bench-output bench-dev bench-adapt-output
