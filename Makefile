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

smoke: venv
	$(PY) -m moe_train.smoke

test: venv
	$(PY) -m pytest -q -ra

bench: venv
	$(PY) -m bench --quick

clean:
	rm -rf .venv work_dirs
