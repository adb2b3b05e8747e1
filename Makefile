# make demo: the quick-start job; make test: install and run the whole test suite (what CI runs);
# make test-fast: the suite without the tests marked slow (end-to-end, compile-heavy), an inner loop;
# make fuzz: the delegate's mutation campaign under ASan + UBSan with a larger sample than the suite's.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.n2uq_tf-installed

.PHONY: install test test-fast demo benchmark fuzz clean

# Test processes (pytest-xdist): one per core of a CI machine; each file's tests stay on one worker
# so its module fixtures (trained and exported models) are built once.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

install: $(STAMP)

$(STAMP): setup.cfg setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[data,test,plots,litert]'
	$(PY) -c "import n2uq_tf.ops as o; print('n2uq_tf quantizer:', o.active_implementation())"
	touch $(STAMP)

# pytest exits 5 when it collected no test: that is a failure here, not a pass.
test: install
	$(PYTEST) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: install
	$(PYTEST) -m "not slow" tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# FUZZ_CASES random mutants (plus option, op-I/O and resize edits) from seed FUZZ_SEED, in both interpreters.
FUZZ_CASES ?= 2000
FUZZ_SEED ?= 1
fuzz: install
	N2UQ_FUZZ_CASES=$(FUZZ_CASES) N2UQ_FUZZ_SEED=$(FUZZ_SEED) N2UQ_FUZZ_BACKENDS=litert,tflite \
		$(PY) -m pytest -q -s tests/test_delegate_fuzz.py

demo: install
	$(PY) examples/quickstart.py

benchmark: install
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
