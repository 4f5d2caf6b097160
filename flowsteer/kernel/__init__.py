"""Thin typed wrappers over the Linux facilities flowsteer uses: libbpf, namespaces, bpffs, sockets."""
