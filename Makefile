# The README's two commands: `make demo` and `make test`. Each builds .venv on first use.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench insight-eval soak schema browser screenshots clean gpu-wheels

# The pinned requirements, then this package itself (editable: `import livetrain` sees the
# work tree), exactly what a user does with `pip install -e .`.
$(STAMP): requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) demo.py

# Browser tests need Debian's chromium and chromium-driver; install them when absent.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Three tests at a time on two cores (pytest-xdist): most of them wait on a trainer or a
# board they start (two at a time kept 1.6 of 2 cores busy); a worker that is done steals
# tests from the other's queue. The slowest 25 are listed at the end, so a CI log shows
# where the time goes.
test: $(STAMP) browser lint
	$(PYTHON) -m pytest -n 3 --dist worksteal --durations=25

# The README's pictures: the browser tests that take them, writing docs/*.png (a plain
# `make test` saves them in temporary folders and leaves the work tree clean).
screenshots: $(STAMP) browser
	SCREENSHOTS=1 $(PYTHON) -m pytest tests/test_browser_board.py tests/test_browser_compare.py \
	  tests/test_browser_insight.py

bench: $(STAMP)
	$(PYTHON) -m bench

# What bench.gpu_check needs on a lent GPU machine that has torch but not the trainer
# side's packages and cannot download: their wheels, for Linux x86-64 and Python
# 3.10 to 3.12 (`python -m bench.gpu_check --wheels gpu-wheels` installs them from
# there). The folder must stay under 64 MiB, what travels to that machine.
GPU_WHEELS := SQLAlchemy psutil typing_extensions greenlet
gpu-wheels: $(STAMP)
	rm -rf gpu-wheels
	for v in 3.10 3.11 3.12; do \
	  $(PYTHON) -m pip download --quiet --only-binary=:all: --platform manylinux2014_x86_64 \
	    --python-version $$v $(GPU_WHEELS) -d gpu-wheels || exit 1; \
	done
	@size=$$(du -sk gpu-wheels | cut -f1); ls gpu-wheels; echo "gpu-wheels: $$size KiB"; \
	  test $$size -lt 65536 || (echo "gpu-wheels is over 64 MiB" >&2; exit 1)

# The health rules against real runs: false alarms on 50 healthy ones (a tuning half and an
# evaluation half no threshold was set on), and how soon each pathology is flagged (about
# 15 minutes on 2 cores; not in `bench`).
insight-eval: $(STAMP)
	$(PYTHON) -m bench.insight

# 20 minutes of training with the board refreshing every second; memory, events, rows.
soak: $(STAMP)
	$(PYTHON) -m bench.soak --minutes 20

# db/schema.sql is generated from livetrain/db/schema.py; a test fails when it is stale.
schema: $(STAMP)
	$(PYTHON) -m livetrain.db.schema > db/schema.sql

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
