# flowsteer: `make demo` and `make test` set up everything they need (apt packages, .venv, BPF objects).
VENV      ?= .venv
PY        := $(VENV)/bin/python
CLANG     ?= clang
BPF_SRC   := $(wildcard flowsteer/bpf/*.bpf.c)
# reuseport-select: reuseport.bpf.c without queue migration, for kernels before 5.14 (build_bpf.VARIANTS)
BPF_OBJ   := $(BPF_SRC:.c=.o) flowsteer/bpf/reuseport-select.bpf.o

.PHONY: all setup bpf test unit kernel-smoke test-kernels demo bench dist man mutate clean

all: setup

setup: $(VENV)/.installed bpf

$(VENV)/.installed: pyproject.toml setup.py scripts/bootstrap.sh scripts/apt-install.sh flowsteer/divert/_nfqueue.c
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

bpf: $(VENV)/.installed $(BPF_OBJ)

# scripts/build_bpf.py holds the compiler flags; the wheel build (setup.py) uses it too
flowsteer/bpf/%.bpf.o: flowsteer/bpf/%.bpf.c $(wildcard flowsteer/bpf/*.h) scripts/build_bpf.py | $(VENV)/.installed
	CLANG=$(CLANG) $(PY) scripts/build_bpf.py $< $@

flowsteer/bpf/reuseport-select.bpf.o: flowsteer/bpf/reuseport.bpf.c $(wildcard flowsteer/bpf/*.h) scripts/build_bpf.py | $(VENV)/.installed
	CLANG=$(CLANG) $(PY) scripts/build_bpf.py $< $@

# the whole suite on this kernel, then the kernel smoke under Debian 12's 6.1 in a VM
test: setup
	$(PY) -m pytest -q
	scripts/test-kernels.sh --smoke 6.1

# boot, load and attach every program, one real connection or packet per hook, under KERNELS in VMs
KERNELS ?= 6.1
kernel-smoke: setup
	scripts/test-kernels.sh --smoke $(KERNELS)

# the whole system suite under each kernel in a VM (about 20 minutes per kernel without KVM)
test-kernels: setup
	scripts/test-kernels.sh $(if $(filter command line,$(origin KERNELS)),$(KERNELS),6.1 6.12 5.10)

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

# man pages of every command, from the command line's definitions (click-man): build/man/flowsteer*.1
man: setup
	$(PY) scripts/manpages.py build/man

# Mutation testing of the pure modules ([tool.mutmut] in pyproject.toml; docs/testing.md). Not part of
# `make test`. A whole run starts afresh; `make mutate MUTANTS='flowsteer.divert.packet.*'` reruns only
# the mutants named (shell globs), keeping the other results.
MUTANTS ?=
mutate: setup $(VENV)/.mutate
	$(if $(MUTANTS),,rm -rf mutants)
	nice -n 10 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(PY) scripts/mutation_report.py --min 90

$(VENV)/.mutate: pyproject.toml | $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,mutate]'
	touch $@

clean:
	rm -f flowsteer/bpf/*.bpf.o
	rm -rf build dist mutants
