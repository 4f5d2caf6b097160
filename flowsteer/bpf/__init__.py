"""BPF C sources; the *.bpf.o objects next to them are build outputs (`make bpf`)."""
