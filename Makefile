# flowsteer: `make demo` and `make test` set up everything they need (apt packages, .venv, BPF objects).
VENV      ?= .venv
PY        := $(VENV)/bin/python
ARCH      := $(shell uname -m)
CLANG     ?= clang
BPF_CFLAGS := -O2 -g -target bpf -Wall -Werror -I/usr/include/$(ARCH)-linux-gnu
BPF_SRC   := $(wildcard flowsteer/bpf/*.bpf.c)
BPF_OBJ   := $(BPF_SRC:.c=.o)

.PHONY: all setup bpf test unit demo bench clean

all: setup

setup: $(VENV)/.installed bpf

$(VENV)/.installed: pyproject.toml scripts/bootstrap.sh
	VENV=$(VENV) scripts/bootstrap.sh
	touch $@

bpf: $(VENV)/.installed $(BPF_OBJ)

flowsteer/bpf/%.bpf.o: flowsteer/bpf/%.bpf.c $(wildcard flowsteer/bpf/*.h) | $(VENV)/.installed
	$(CLANG) $(BPF_CFLAGS) -c $< -o $@

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

clean:
	rm -f flowsteer/bpf/*.bpf.o
