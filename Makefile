# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv if missing and install into it; nothing touches the system Python.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch and torchvision must come as a matched pair, in one pip command (smp imports
# torchvision; an unmatched pair fails with "operator torchvision::nms does not exist").
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
# faiss-gpu where an NVIDIA GPU answers, faiss-cpu elsewhere; never both in one env.
FAISS_EXTRA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
FAISS_OTHER := $(if $(filter gpu,$(FAISS_EXTRA)),faiss-cpu,faiss-gpu faiss-gpu-cu12)
export HF_HUB_OFFLINE ?= 1
# A real Label Studio for the annotation tests, in its own venv: its pins (Django, numpy,
# pyarrow) clash with ours. Built on first use; if it cannot be built, `make test` fails
# (the log stays in $(LS_VENV).log) unless ALGES_SKIP_LABEL_STUDIO=1 says to run without
# it: then those tests skip, and pytest lists every skip with its reason at the end.
ALGES_SKIP_LABEL_STUDIO ?=
LS_VENV       ?= .venv-ls
LABEL_STUDIO  ?= label-studio==1.23.2

.PHONY: demo test test-quick install label-studio bench clean

install: $(VENV)/.installed-$(FAISS_EXTRA)

$(VENV)/.installed-$(FAISS_EXTRA): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# keep a user's torch/torchvision pair when it already imports cleanly
	$(PY) scripts/check_torch_pair.py || $(PY) -m pip install $(TORCH_PAIR)
	-$(PY) -m pip uninstall -q -y $(FAISS_OTHER) 2>/dev/null
	$(PY) -m pip install -e ".[dev,$(FAISS_EXTRA)]"
	$(PY) scripts/check_torch_pair.py
	rm -f $(VENV)/.installed-*
	touch $@

demo: install
	$(VENV)/bin/alges demo --out runs/demo

label-studio: $(LS_VENV)/.installed

$(LS_VENV)/.installed:
	@rm -f $(LS_VENV).log
	@( test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV) ) >>$(LS_VENV).log 2>&1 \
	  && $(LS_VENV)/bin/python -m pip install -q "$(LABEL_STUDIO)" >>$(LS_VENV).log 2>&1 \
	  && $(LS_VENV)/bin/python -c "import label_studio, label_studio_sdk" >>$(LS_VENV).log 2>&1 \
	  && touch $@ \
	  || { echo "$(LS_VENV) could not be built (see $(LS_VENV).log): the Label Studio tests cannot run;" \
	            "set ALGES_SKIP_LABEL_STUDIO=1 to run the tests without them" >&2; exit 1; }

# ALGES_SKIP_LABEL_STUDIO=1 make test: run without a real Label Studio (those tests skip, listed at the end)
test: install $(if $(filter 1,$(ALGES_SKIP_LABEL_STUDIO)),,label-studio)
	$(PY) -m pytest

# The edit-test loop: no Ray instance, no subprocess (a test that would start one skips, naming it),
# about 2-3 minutes on 2 cores. `make test` stays the full suite that CI runs.
test-quick: install
	ALGES_QUICK=1 $(PY) -m pytest -m "not ray and not slow" -q

# On an otherwise idle machine (each script prints the load average with its table).
bench: install
	$(PY) scripts/bench_local.py
	$(PY) scripts/bench_scale.py
	$(PY) scripts/bench_scoring.py
	$(PY) scripts/bench_selection.py
	$(PY) scripts/bench_video.py
	$(PY) scripts/bench_pipeline.py

clean:
	rm -rf runs .pytest_cache
