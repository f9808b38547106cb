# Every target creates .venv itself, so a fresh clone needs only `make smoke` or `make test`.
PY := .venv/bin/python
PIP := .venv/bin/pip -q --disable-pip-version-check
export DS_ACCELERATOR ?= cpu

.PHONY: venv smoke test bench clean

venv: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	# torch first, pinned: 2.13.0 is the CPU wheel here, and a range given to pip later
	# would otherwise pull a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

# The main job, small: the tiny recipe on 2 CPU processes under torchrun with ZeRO-3, then the
# exported HF checkpoint is loaded by transformers.
smoke: venv
	rm -rf work_dirs/smoke
	.venv/bin/torchrun --standalone --nproc_per_node 2 -m moe_train.cli train tiny \
		--deepspeed deepspeed_zero3 --launcher pytorch --work-dir work_dirs/smoke --eval-fraction 0.1 --eval-steps 5
	$(PY) -c "from transformers import AutoModelForCausalLM as M; m = M.from_pretrained('work_dirs/smoke/hf_model'); \
		print('transformers loaded', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')"
	.venv/bin/moe-train report work_dirs/smoke --out work_dirs/smoke-report

test: venv
	$(PY) -m pytest -q -ra

bench: venv
	$(PY) -m bench --quick

clean:
	rm -rf .venv work_dirs
