# flowsteer: `make demo` and `make test` set up everything they need (apt packages, .venv, BPF objects).
VENV      ?= .venv
PY        := $(VENV)/bin/python
CLANG     ?= clang
BPF_SRC   := $(wildcard flowsteer/bpf/*.bpf.c)
BPF_OBJ   := $(BPF_SRC:.c=.o)

.PHONY: all setup bpf test unit demo bench dist clean

all: setup

setup: $(VENV)/.installed bpf

$(VENV)/.installed: pyproject.toml setup.py scripts/bootstrap.sh scripts/apt-install.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

bpf: $(VENV)/.installed $(BPF_OBJ)

# scripts/build_bpf.py holds the compiler flags; the wheel build (setup.py) uses it too
flowsteer/bpf/%.bpf.o: flowsteer/bpf/%.bpf.c $(wildcard flowsteer/bpf/*.h) scripts/build_bpf.py | $(VENV)/.installed
	CLANG=$(CLANG) $(PY) scripts/build_bpf.py $< $@

test: setup
	$(PY) -m pytest -q

unit: setup
	$(PY) -m pytest -q tests/unit

demo: setup
	$(PY) -m flowsteer.demo

bench: setup
	$(PY) bench/lookup.py
	$(PY) bench/reuseport.py
	$(PY) bench/divert.py

# dist/: the sdist (sources) and the wheel (with the compiled BPF objects), built with the .venv's setuptools
dist: setup
	$(PY) -m build --no-isolation --outdir dist

clean:
	rm -f flowsteer/bpf/*.bpf.o
	rm -rf build dist
