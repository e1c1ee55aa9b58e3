# The README's two commands: `make demo` and `make test`. Each builds .venv on first use.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench insight-eval soak schema browser screenshots clean

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

# Two tests at a time (pytest-xdist): most of them wait on a trainer or a board they start.
test: $(STAMP) browser lint
	$(PYTHON) -m pytest -n 2

# The README's pictures: the browser tests that take them, writing docs/*.png (a plain
# `make test` saves them in temporary folders and leaves the work tree clean).
screenshots: $(STAMP) browser
	SCREENSHOTS=1 $(PYTHON) -m pytest tests/test_browser_board.py tests/test_browser_compare.py \
	  tests/test_browser_insight.py

bench: $(STAMP)
	$(PYTHON) -m bench

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
