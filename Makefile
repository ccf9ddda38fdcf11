# centrifugo-relay: `make run` and `make test` are all the set-up a new machine needs.
# The interpreter the venv is made from: the distribution's /usr/bin/python3 when it is 3.11 or newer,
# else python3 from PATH; `make PYTHON=...` picks another. The relay spends about a tenth less CPU
# per record on Debian's python3.11 (linked statically) than on pyenv's default build (a shared
# libpython, no PGO): README.md, "Which Python"; bench/interpreter_bench.py measures it.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            && echo /usr/bin/python3 || echo python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fuzz bench protos docs lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

run: $(STAMP)  ## the default pipeline: embedded server + ticker + file tail (of var/log/*.log)
	mkdir -p var/log
	$(VENV)/bin/relay run -c config.toml

test: $(STAMP)  ## the whole suite; starts real Kafka and real Centrifugo itself
	$(PY) -m tests.harness.prepare
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

test-fuzz: $(STAMP)  ## the long fuzz profile (10,000 examples per target)
	RELAY_FUZZ_EXAMPLES=10000 $(PY) -m pytest -p no:cacheprovider -m slow -s tests/test_fuzz.py

bench: $(STAMP)  ## every benchmark; writes BENCHMARKS.md and plots
	$(PY) bench/run.py

protos: $(STAMP)  ## regenerate relay/proto/ from protos/
	$(PY) protos/generate.py

docs: $(STAMP)  ## rewrite README.md's option tables from the config models
	$(PY) -m relay.reference README.md

lint: $(STAMP)
	$(VENV)/bin/ruff check relay tests bench
	$(VENV)/bin/mypy relay

clean:
	rm -rf $(VENV) var .pytest_cache
