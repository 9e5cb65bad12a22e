# immunoprofile: every target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo_output
export MPLBACKEND := Agg

.PHONY: install demo test browser bench fuzz sample-data clean

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
	    --by group --out $(DEMO)/longitudinal
	$(BIN)/immunoprofile plot longitudinal $(DEMO)/gate --population "CD4 PD1+" \
	    --population "NK CD57+LIR1+" --out $(DEMO)/longitudinal.png
	$(BIN)/immunoprofile plot longitudinal $(DEMO)/gate -p "CD4 PD1+" -p "CD8 PD1+" -p "NK CD57+LIR1+" \
	    --facet patient --out $(DEMO)/per_patient.png
	$(BIN)/immunoprofile plot paired $(DEMO)/gate --pre pre --post post_clofarabine \
	    --stats $(DEMO)/compare --out $(DEMO)/paired.png
	$(BIN)/immunoprofile plot heatmap $(DEMO)/gate --pre pre --post post_clofarabine --out $(DEMO)/heatmap.png
	$(BIN)/immunoprofile plot gates $(DEMO)/gate --out $(DEMO)/qc/
	$(BIN)/immunoprofile report $(DEMO)/gate --stats $(DEMO)/compare --out $(DEMO)/report.html
	@echo "demo results in $(DEMO)/ (open $(DEMO)/report.html)"

## The test suite (what .ci/run calls).
test: $(STAMP) browser
	$(PY) -m pytest -q

## Headless Chromium for the report's browser test (Debian's package; skipped where it cannot be had).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	    echo "note: chromium not installed; the browser test will be skipped"

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
