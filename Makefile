# immunoprofile: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_output
export MPLBACKEND := Agg

.PHONY: install demo test bench fuzz sample-data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The main job, end to end, on the bundled sample data.
demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/immunoprofile gate --template t_cell_exhaustion --template nk_inhibitory \
	    --samples sample_data/samplesheet.csv --out $(DEMO)/gate
	$(BIN)/immunoprofile compare $(DEMO)/gate --pre pre --post post_clofarabine --by group \
	    --out $(DEMO)/compare
	$(BIN)/immunoprofile compare $(DEMO)/gate --timepoints pre,post_clofarabine,post_lenalidomide \
	    --out $(DEMO)/longitudinal
	@echo "demo results in $(DEMO)/"

## The test suite (what .ci/run calls).
test: $(STAMP)
	$(PY) -m pytest -q

## Performance benchmark (never part of the tests).
bench: $(STAMP)
	$(PY) benchmarks/bench.py --out bench_output

## Longer fuzzing of the FCS reader.
fuzz: $(STAMP)
	IMMUNOPROFILE_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_fcs_fuzz.py

## Regenerate sample_data/ byte for byte.
sample-data: $(STAMP)
	$(BIN)/immunoprofile simulate --out sample_data --patients 6 --events 5000 --seed 2026 --force

clean:
	rm -rf $(VENV) $(DEMO) bench_output .pytest_cache
