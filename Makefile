# Every target creates .venv itself, so a fresh clone needs only `make smoke` or `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip -q --disable-pip-version-check
export DS_ACCELERATOR ?= cpu

.PHONY: venv smoke test bench gpu-bundle clean

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch first, pinned: 2.13.0 is the CPU wheel here, and a range given to pip later
	# would otherwise pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

# The main job, small: the tiny recipe on 2 CPU processes with ZeRO-3, started in the seed's env form
# (NPROC_PER_NODE: moe-train starts torchrun itself), then the exported HF checkpoint is loaded by transformers.
smoke: venv
	rm -rf work_dirs/smoke
	NPROC_PER_NODE=2 .venv/bin/moe-train train tiny --deepspeed deepspeed_zero3 --launcher pytorch \
		--work-dir work_dirs/smoke --eval-fraction 0.1 --eval-steps 5
	$(PY) -c "from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('work_dirs/smoke/hf_model'); \
		print('transformers loaded', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')"
	.venv/bin/moe-train report work_dirs/smoke --out work_dirs/smoke-report

# Lint and layering first (seconds), then the whole suite.
test: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/lint-imports
	$(PY) -m pytest -q -ra -n 2 --dist loadgroup --durations=30

bench: venv
	$(PY) -m bench --quick

# The wheels an air-gapped CUDA node with only torch (>= 2.11) and transformers needs to run
# `python -m bench.gpu` (see docs/gpu.md): DeepSpeed, built here as a pure-Python wheel (PyPI has
# only its sdist; no ops compiled, it JIT-builds them on the node if ever needed), and its
# dependencies for CPython $(BUNDLE_PY) on manylinux x86_64, at the versions this venv was tested with;
# pytest too, for the GPU tests the script runs.
BUNDLE_PY ?= 3.12
BUNDLE_DEPS := einops hjson msgpack ninja psutil py-cpuinfo pydantic pydantic-core annotated-types typing-inspection \
	pytest pluggy iniconfig pygments pytest-timeout
gpu-bundle: venv
	rm -rf .whl && mkdir -p .whl
	DS_ACCELERATOR=cuda DS_BUILD_OPS=0 $(PIP) wheel --no-deps --no-build-isolation -w .whl \
		deepspeed==$$($(PY) -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	$(PIP) download --no-deps --only-binary=:all: -d .whl --python-version $(BUNDLE_PY) --implementation cp \
		--abi cp$(subst .,,$(BUNDLE_PY)) --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_28_x86_64 nvidia-ml-py==13.615.71 \
		$$($(PY) -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(BUNDLE_DEPS)'.split()))")
	$(PY) -m bench.bundle check .whl

clean:
	rm -rf .venv work_dirs
