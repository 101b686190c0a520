# Two commands do all set-up:  `make quickstart` (install, synthetic data, train, evaluate, demo)  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
QUICK_RUN := saved_models/quick

.PHONY: install quickstart test docs bench clean
install: $(STAMP)

# torch first, pinned: its CPU wheel is on disk here, a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

quickstart: install
	$(BIN)/python prepare_synthetic.py data/synthetic
	$(BIN)/python trainer.py config_quick.yaml
	$(BIN)/python evaluate.py config_quick.yaml resume=$(QUICK_RUN)/best.pt
	$(BIN)/python demo.py config_quick.yaml resume=$(QUICK_RUN)/best.pt \
	    $$(ls data/synthetic/test/*.png | head -n 1)

# -rs prints why a test was skipped (tests/test_serve.py without /usr/bin/chromium).
test: install
	$(BIN)/python -m pytest -q -rs tests

# The documentation site (docs/ -> site/); strict: a broken link, a missing page or a warning fails.
docs: install
	$(BIN)/python -m pip install -q mkdocs==1.6.1
	$(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python benchmark.py

clean:
	rm -rf $(VENV) saved_models data/synthetic site
