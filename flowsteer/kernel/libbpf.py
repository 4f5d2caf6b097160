"""A typed ctypes layer over libbpf: objects, programs, maps, pins and links.

Everything here works on raw bytes for keys and values; the hooks encode their own structs. Every failure
raises :class:`~flowsteer.errors.KernelError` (or PermissionDenied) naming the operation and carrying the
errno libbpf returned, with libbpf's own log lines (for example the verifier's complaint) in the detail.

Ownership: each :class:`Map`, :class:`Program` and :class:`Link` owns one file descriptor and closes it on
:meth:`close` or when used as a context manager. Objects obtained from a :class:`BpfObject` are
duplicates, so they outlive the object.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno as errno_mod
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self

from flowsteer.errors import FlowsteerError, KernelError, kernel_error
from flowsteer.kernel.libc import libc


class MapType(enum.IntEnum):
    HASH = 1
    ARRAY = 2
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    SOCKMAP = 15
    SOCKHASH = 18
    REUSEPORT_SOCKARRAY = 20


class ProgType(enum.IntEnum):
    XDP = 6
    SK_REUSEPORT = 21
    SK_LOOKUP = 30


class AttachType(enum.IntEnum):
    SK_LOOKUP = 36
    SK_REUSEPORT_SELECT = 39
    SK_REUSEPORT_SELECT_OR_MIGRATE = 40


BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_NO_PREALLOC = 1 << 0
BPF_F_RDONLY = 1 << 3
BPF_F_REPLACE = 1 << 2
# errnos of a batch operation the map's type does not have (ENOTSUPP, the kernel's own 524, included)
_NO_BATCH = frozenset({errno_mod.EINVAL, errno_mod.EOPNOTSUPP, 524})

_LIB_NAME = "libbpf.so.1"


class _MapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32), ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64), ("btf_id", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32), ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64), ("name", ctypes.c_char * 16),
        ("_middle", ctypes.c_uint8 * 112),  # ifindex … prog_tags: not read
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
        ("_rest", ctypes.c_uint8 * 128),
    ]


class _LinkInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32), ("netns_ino", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 64),
    ]


class _ObjGetOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("file_flags", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class _ProgLoadOpts(ctypes.Structure):
    # the head of struct bpf_prog_load_opts; libbpf reads ``sz`` and treats the fields after it as zero
    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_uint32), ("expected_attach_type", ctypes.c_uint32)]


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts of libbpf 1.x (bpf/bpf.h)
    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


class _MapCreateOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t), ("btf_fd", ctypes.c_uint32), ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32), ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32), ("map_flags", ctypes.c_uint32), ("map_extra", ctypes.c_uint64),
        ("numa_node", ctypes.c_uint32), ("map_ifindex", ctypes.c_uint32),
    ]


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_log = threading.local()


def _load_library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(_LIB_NAME, use_errno=True)
    except OSError as exc:
        raise FlowsteerError(f"cannot load {_LIB_NAME} ({exc}); install libbpf1") from None
    vp, cp, i, u32, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
    signatures: dict[str, tuple[object, list[object]]] = {
        "bpf_object__open_file": (vp, [cp, vp]),
        "bpf_object__load": (i, [vp]),
        "bpf_object__close": (None, [vp]),
        "bpf_object__find_map_by_name": (vp, [vp, cp]),
        "bpf_object__find_program_by_name": (vp, [vp, cp]),
        "bpf_object__next_map": (vp, [vp, vp]),
        "bpf_map__name": (cp, [vp]),
        "bpf_map__fd": (i, [vp]),
        "bpf_map__reuse_fd": (i, [vp, i]),
        "bpf_map__set_max_entries": (i, [vp, u32]),
        "bpf_map__type": (i, [vp]),
        "bpf_map__key_size": (u32, [vp]),
        "bpf_map__value_size": (u32, [vp]),
        "bpf_map__max_entries": (u32, [vp]),
        "bpf_map__map_flags": (u32, [vp]),
        "bpf_map__inner_map": (vp, [vp]),
        "bpf_program__fd": (i, [vp]),
        "bpf_program__set_expected_attach_type": (i, [vp, i]),
        "bpf_map_create": (i, [i, cp, u32, u32, u32, vp]),
        "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
        "bpf_map_lookup_elem": (i, [i, vp, vp]),
        "bpf_map_delete_elem": (i, [i, vp]),
        "bpf_map_get_next_key": (i, [i, vp, vp]),
        "bpf_map_update_batch": (i, [i, vp, vp, ctypes.POINTER(u32), vp]),
        "bpf_map_lookup_batch": (i, [i, vp, vp, vp, vp, ctypes.POINTER(u32), vp]),
        "bpf_map_get_fd_by_id": (i, [u32]),
        "bpf_prog_get_fd_by_id": (i, [u32]),
        "bpf_obj_pin": (i, [i, cp]),
        "bpf_obj_get_opts": (i, [cp, vp]),
        "bpf_obj_get_info_by_fd": (i, [i, vp, ctypes.POINTER(u32)]),
        "bpf_link_create": (i, [i, i, i, vp]),
        "bpf_link_update": (i, [i, i, vp]),
        "bpf_link_detach": (i, [i]),
        "libbpf_num_possible_cpus": (i, []),
        "libbpf_major_version": (u32, []),
        "libbpf_minor_version": (u32, []),
        "libbpf_set_print": (vp, [_PRINT_FN]),
        "libbpf_probe_bpf_prog_type": (i, [i, vp]),
        "bpf_prog_load": (i, [i, cp, cp, vp, sz, vp]),
        "bpf_prog_test_run_opts": (i, [i, vp]),
        "bpf_enable_stats": (i, [i]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


class _Unavailable:
    """Stands for libbpf when it cannot be loaded, so that importing this module still works (and with it
    every command that needs no BPF, such as ``flowsteer version``): any use raises the loading error."""

    def __init__(self, error: FlowsteerError) -> None:
        self.message = error.message

    def __getattr__(self, name: str) -> Any:
        raise FlowsteerError(self.message)


_lib: Any
try:
    _lib = _load_library()
except FlowsteerError as exc:
    _lib = _Unavailable(exc)
_libc = libc
_libc.vasprintf.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_void_p]
_libc.free.argtypes = [ctypes.c_void_p]


@_PRINT_FN
def _capture_print(level: int, fmt: bytes, args: int) -> int:
    # libbpf hands us a printf format and a va_list, which can be consumed once: vasprintf formats the
    # whole message (a verifier log runs to megabytes) into memory it allocates, so nothing is cut.
    lines: list[str] | None = getattr(_log, "lines", None)
    if lines is None:
        return 0
    text = ctypes.c_void_p()
    if _libc.vasprintf(ctypes.byref(text), fmt, args) < 0:
        lines.append("(a libbpf message could not be formatted: out of memory)")
        return 0
    try:
        lines.extend(ctypes.string_at(text.value).decode(errors="replace").rstrip().splitlines())
    finally:
        _libc.free(text)
    return 0


if not isinstance(_lib, _Unavailable):
    _lib.libbpf_set_print(_capture_print)


@contextlib.contextmanager
def _capturing_log() -> Iterator[None]:
    """Collects libbpf's messages in this thread while the block runs (for _failure to quote)."""
    _log.lines = []
    try:
        yield
    finally:
        _log.lines = None


def _check(ret: int, operation: str) -> int:
    """Returns ``ret`` when non-negative; raises the KernelError for ``-ret`` otherwise, carrying
    libbpf's whole log of the operation (``log``) and its last lines in the message."""
    if ret < 0:
        raise _failure(operation, -ret)
    return ret


def _failure(operation: str, err: int) -> KernelError:
    lines = [line for line in getattr(_log, "lines", None) or [] if line.strip()]
    # the verifier's reason is at the end of its log, before libbpf's closing marker and summary
    reason = [line for line in lines if not line.startswith("-- END PROG LOAD LOG --")]
    return kernel_error(operation, err, " | ".join(line.strip() for line in reason[-6:]), log="\n".join(lines))


def version() -> str:
    """Returns the version of the libbpf flowsteer loaded, as ``MAJOR.MINOR``."""
    return f"{_lib.libbpf_major_version()}.{_lib.libbpf_minor_version()}"


def probe_prog_type(prog_type: ProgType) -> bool:
    """Returns whether the running kernel loads programs of ``prog_type`` (libbpf's probe loads a
    minimal one). Raises KernelError when the probe itself fails (no privilege, say)."""
    return bool(_check(_lib.libbpf_probe_bpf_prog_type(int(prog_type), None), f"probe program type {prog_type.name}"))


def prog_load(prog_type: ProgType, name: str, instructions: bytes,
              attach_type: AttachType | None = None) -> "Program":
    """Loads the raw ``instructions`` (8 bytes each) as a GPL program of ``prog_type`` and returns it.

    For feature probes that a compiled object cannot express. Raises KernelError (the verifier's log on
    it) when the kernel refuses.
    """
    if len(instructions) % 8:
        raise ValueError("BPF instructions are 8 bytes each")
    opts = _ProgLoadOpts(ctypes.sizeof(_ProgLoadOpts), 0, int(attach_type or 0))
    with _capturing_log():
        fd = _lib.bpf_prog_load(int(prog_type), name.encode(), b"GPL", instructions, len(instructions) // 8,
                                ctypes.byref(opts))
        return Program(_check(fd, f"load program {name}"))


# Raw instructions, for probes and for programs too small to compile (opcodes from linux/bpf.h;
# tests/unit/test_shared_constants.py checks them).
LDX_MEM_DW, MOV64_IMM, EXIT = 0x79, 0xB7, 0x95


def instruction(code: int, dst: int = 0, src: int = 0, offset: int = 0, imm: int = 0) -> bytes:
    """Returns one BPF instruction (8 bytes): opcode ``code``, registers ``dst`` and ``src``."""
    return struct.pack("<BBhi", code, src << 4 | dst, offset, imm)


def returning(value: int) -> bytes:
    """Returns the instructions of the program ``return value``."""
    return instruction(MOV64_IMM, dst=0, imm=value) + instruction(EXIT)


def prog_test_run(program: "Program", data: bytes, ctx: bytes, flags: int, what: str) -> int:
    """Runs ``program`` once on the packet ``data`` with the context ``ctx`` (``BPF_PROG_TEST_RUN``, with
    ``flags``) and returns the program's return value. Raises KernelError naming ``what`` when the
    kernel refuses (EINVAL for flags it does not know)."""
    data_in, ctx_in = ctypes.create_string_buffer(data, len(data)), ctypes.create_string_buffer(ctx, len(ctx))
    opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), data_in=ctypes.addressof(data_in), data_size_in=len(data),
                        ctx_in=ctypes.addressof(ctx_in), ctx_size_in=len(ctx), repeat=1, flags=flags)
    _check(_lib.bpf_prog_test_run_opts(program.fd, ctypes.byref(opts)), what)
    return int(opts.retval)


def possible_cpus() -> int:
    """Returns the number of possible CPUs (the length of a per-CPU value)."""
    return _check(_lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def run_time_stats() -> Iterator[None]:
    """Makes the kernel count every BPF program's runs and run time (:attr:`ProgramInfo.run_count`,
    :attr:`ProgramInfo.run_time_ns`) while the block runs, without touching the
    ``kernel.bpf_stats_enabled`` sysctl: counting stops when the last holder lets go, also when it dies.
    Counting costs a clock read per run, for every program on the host.

    Raises KernelError: EINVAL before Linux 5.8, EPERM without CAP_SYS_ADMIN.
    """
    fd = _check(_lib.bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run-time statistics")
    try:
        yield
    finally:
        os.close(fd)


class _Fd:
    """Owns one file descriptor."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def pin(self, path: str) -> None:
        """Pins the object at ``path`` in a bpffs; raises KernelError (EEXIST when taken)."""
        _check(_lib.bpf_obj_pin(self.fd, path.encode()), f"pin {path}")

    @classmethod
    def _get_pinned(cls, path: str, readonly: bool) -> int:
        opts = _ObjGetOpts(sz=ctypes.sizeof(_ObjGetOpts), file_flags=BPF_F_RDONLY if readonly else 0)
        return _check(_lib.bpf_obj_get_opts(path.encode(), ctypes.byref(opts)), f"open pinned {path}")


@dataclass(frozen=True)
class MapInfo:
    """What the kernel says about a map."""

    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


class Map(_Fd):
    """A BPF map reached through a file descriptor; keys and values are bytes of the map's sizes."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        info = self.info()
        self.key_size = info.key_size
        self.value_size = info.value_size
        self._percpu = info.type == MapType.PERCPU_ARRAY

    @classmethod
    def open_pinned(cls, path: str, readonly: bool = False) -> "Map":
        """Opens the map pinned at ``path``; raises KernelError (ENOENT when missing)."""
        return cls(cls._get_pinned(path, readonly))

    @classmethod
    def from_id(cls, map_id: int) -> "Map":
        """Opens the map with kernel id ``map_id``; raises KernelError (ENOENT when gone)."""
        return cls(_check(_lib.bpf_map_get_fd_by_id(map_id), f"open map id {map_id}"))

    @classmethod
    def create(cls, map_type: MapType, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0, inner_map: "Map | None" = None) -> "Map":
        """Creates a new map; raises KernelError when the kernel refuses it."""
        opts = _MapCreateOpts(sz=ctypes.sizeof(_MapCreateOpts), map_flags=flags,
                              inner_map_fd=inner_map.fd if inner_map else 0)
        fd = _lib.bpf_map_create(int(map_type), name.encode()[:15], key_size, value_size, max_entries,
                                 ctypes.byref(opts))
        return cls(_check(fd, f"create map {name}"))

    def info(self) -> MapInfo:
        """Returns the kernel's description of this map."""
        raw = _MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(raw))
        _check(_lib.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(raw), ctypes.byref(size)), "map info")
        return MapInfo(raw.type, raw.id, raw.key_size, raw.value_size, raw.max_entries, raw.map_flags,
                       raw.name.decode())

    def _value_buffer(self) -> ctypes.Array[ctypes.c_char]:
        size = self.value_size * (possible_cpus() if self._percpu else 1)
        return ctypes.create_string_buffer(size)

    def _key(self, key: bytes) -> bytes:
        if len(key) != self.key_size:
            raise ValueError(f"key of {len(key)} bytes for a map with {self.key_size}-byte keys")
        return key

    def lookup(self, key: bytes) -> bytes | None:
        """Returns the value at ``key`` (per-CPU maps: all CPUs' values concatenated), or None."""
        buf = self._value_buffer()
        ret = _lib.bpf_map_lookup_elem(self.fd, self._key(key), buf)
        if ret == -errno_mod.ENOENT:
            return None
        _check(ret, "map lookup")
        return buf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        """Returns the per-CPU values at ``key`` of a per-CPU map (empty values when absent)."""
        raw = self.lookup(key)
        if raw is None:
            return []
        return [raw[i:i + self.value_size] for i in range(0, len(raw), self.value_size)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Stores ``value`` at ``key``; raises KernelError with the kernel's errno on refusal."""
        if not self._percpu and len(value) != self.value_size:
            raise ValueError(f"value of {len(value)} bytes for a map with {self.value_size}-byte values")
        _check(_lib.bpf_map_update_elem(self.fd, self._key(key), value, flags), "map update")

    def update_batch(self, keys: bytes, values: bytes) -> None:
        """Stores many entries in one system call: ``keys`` and ``values`` are the keys and values laid
        end to end. Raises ValueError when their lengths disagree with the map's sizes, KernelError with
        the kernel's errno on refusal (entries before the failing one may have been written)."""
        count, rest = divmod(len(keys), self.key_size)
        if rest or len(values) != count * self.value_size:
            raise ValueError(f"{len(keys)} key bytes and {len(values)} value bytes do not make whole entries "
                             f"of {self.key_size}-byte keys and {self.value_size}-byte values")
        done = ctypes.c_uint32(count)
        _check(_lib.bpf_map_update_batch(self.fd, keys, values, ctypes.byref(done), None), "map batch update")

    def values_batch(self, count: int) -> bytes:
        """Returns the values of keys 0..count-1 of an array map laid end to end, read in one system call.

        Raises KernelError with the kernel's errno on refusal (EINVAL: the map is not an array).
        """
        keys = ctypes.create_string_buffer(count * self.key_size)
        values = ctypes.create_string_buffer(count * self.value_size)
        out = ctypes.create_string_buffer(self.key_size)
        done = ctypes.c_uint32(count)
        ret = _lib.bpf_map_lookup_batch(self.fd, None, out, keys, values, ctypes.byref(done), None)
        if ret < 0 and ret != -errno_mod.ENOENT:  # ENOENT: the batch reached the end of the map
            _check(ret, "map batch lookup")
        if done.value != count:
            raise kernel_error("map batch lookup", errno_mod.EIO, f"{done.value} of {count} entries read")
        return values.raw

    def delete(self, key: bytes) -> bool:
        """Deletes ``key``; returns False when it was not there."""
        ret = _lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno_mod.ENOENT:
            return False
        _check(ret, "map delete")
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterates over the keys present (kernel order; a concurrent change may skip or repeat)."""
        nxt = ctypes.create_string_buffer(self.key_size)
        prev: bytes | None = None
        while True:
            ret = _lib.bpf_map_get_next_key(self.fd, prev, nxt)
            if ret == -errno_mod.ENOENT:
                return
            _check(ret, "map iterate")
            prev = nxt.raw
            yield prev

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Iterates over ``(key, value)`` pairs, skipping keys deleted while iterating."""
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:
                yield key, value

    def snapshot(self, chunk: int = 8192) -> dict[bytes, bytes]:
        """Returns every ``key: value`` of the map, read ``chunk`` entries per system call where the
        kernel offers batch lookups for the map's type (else entry by entry, as :meth:`items`)."""
        found: dict[bytes, bytes] = {}
        keys = ctypes.create_string_buffer(chunk * self.key_size)
        values = ctypes.create_string_buffer(chunk * self.value_size)
        token_in, token_out = (ctypes.create_string_buffer(max(self.key_size, 8)) for _ in range(2))
        first = True
        while True:
            done = ctypes.c_uint32(chunk)
            ret = _lib.bpf_map_lookup_batch(self.fd, None if first else token_in, token_out, keys, values,
                                            ctypes.byref(done), None)
            if ret < 0 and ret != -errno_mod.ENOENT:
                if first and -ret in _NO_BATCH:
                    return dict(self.items())
                _check(ret, "map batch lookup")
            k, v = keys.raw, values.raw
            for i in range(done.value):
                found[k[i * self.key_size:(i + 1) * self.key_size]] = v[i * self.value_size:(i + 1) * self.value_size]
            if ret < 0:  # ENOENT: the batch reached the end of the map
                return found
            ctypes.memmove(token_in, token_out, len(token_out))
            first = False

    def update_all(self, entries: dict[bytes, bytes]) -> None:
        """Stores every ``key: value`` of ``entries``, in one system call where the kernel offers batch
        updates for the map's type (else entry by entry). Raises KernelError with the kernel's errno on
        refusal (entries before the failing one may have been written)."""
        if not entries:
            return
        try:
            self.update_batch(b"".join(entries), b"".join(entries.values()))
        except KernelError as exc:
            if exc.errno not in _NO_BATCH:
                raise
            for key, value in entries.items():
                self.update(key, value)


@dataclass(frozen=True)
class ProgramInfo:
    """What the kernel says about a loaded program."""

    type: int
    id: int
    tag: str
    name: str
    run_time_ns: int = 0
    """Nanoseconds spent running it while :func:`run_time_stats` was on (0 when it never was)."""
    run_count: int = 0
    """How many times it ran while :func:`run_time_stats` was on."""


class Program(_Fd):
    """A loaded BPF program."""

    @classmethod
    def open_pinned(cls, path: str) -> "Program":
        """Opens the program pinned at ``path``; raises KernelError (ENOENT when missing)."""
        return cls(cls._get_pinned(path, False))

    @classmethod
    def from_id(cls, prog_id: int) -> "Program":
        """Opens the program with kernel id ``prog_id``; raises KernelError when gone."""
        return cls(_check(_lib.bpf_prog_get_fd_by_id(prog_id), f"open program id {prog_id}"))

    def info(self) -> ProgramInfo:
        """Returns the kernel's description of this program."""
        raw = _ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(raw))
        _check(_lib.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(raw), ctypes.byref(size)), "program info")
        return ProgramInfo(raw.type, raw.id, bytes(raw.tag).hex(), raw.name.decode(), raw.run_time_ns, raw.run_cnt)


@dataclass(frozen=True)
class LinkInfo:
    """What the kernel says about a link: its id and the id of the program it runs."""

    id: int
    prog_id: int


class Link(_Fd):
    """A BPF link: an attachment of a program that lives as long as its fd or pin."""

    @classmethod
    def create(cls, prog: Program, target_fd: int, attach_type: AttachType) -> "Link":
        """Attaches ``prog`` to the object behind ``target_fd``; raises KernelError on refusal."""
        fd = _lib.bpf_link_create(prog.fd, target_fd, int(attach_type), None)
        return cls(_check(fd, f"attach program ({attach_type.name})"))

    @classmethod
    def open_pinned(cls, path: str) -> "Link":
        """Opens the link pinned at ``path``; raises KernelError (ENOENT when missing)."""
        return cls(cls._get_pinned(path, False))

    def update(self, prog: Program) -> None:
        """Atomically replaces the program this link runs."""
        _check(_lib.bpf_link_update(self.fd, prog.fd, None), "replace linked program")

    def detach(self) -> None:
        """Detaches the program now, whoever else still holds the link (the link stays, defunct)."""
        _check(_lib.bpf_link_detach(self.fd), "detach link")

    def info(self) -> LinkInfo:
        """Returns the kernel's description of this link."""
        raw = _LinkInfo()
        size = ctypes.c_uint32(ctypes.sizeof(raw))
        _check(_lib.bpf_obj_get_info_by_fd(self.fd, ctypes.byref(raw), ctypes.byref(size)), "link info")
        return LinkInfo(raw.id, raw.prog_id)


def _map_definition(ptr: int, name: str) -> MapInfo:
    return MapInfo(_lib.bpf_map__type(ptr), 0, _lib.bpf_map__key_size(ptr), _lib.bpf_map__value_size(ptr),
                   _lib.bpf_map__max_entries(ptr), _lib.bpf_map__map_flags(ptr), name)


class BpfObject:
    """An ELF object file opened with libbpf, whose maps may reuse pinned maps before :meth:`load`.

    Use as a context manager: the object (and every fd libbpf holds for it) closes on exit; maps and
    programs taken with :meth:`map` / :meth:`program` after loading are independent duplicates.
    """

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise FlowsteerError(f"BPF object {path} is missing; build it with `make bpf`")
        with _capturing_log():
            ptr = _lib.bpf_object__open_file(path.encode(), None)
            if not ptr:
                raise _failure(f"open BPF object {path}", ctypes.get_errno() or errno_mod.EINVAL)
        self._ptr: int | None = ptr
        self.path = path

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ptr:
            _lib.bpf_object__close(self._ptr)
            self._ptr = None

    def _map_ptr(self, name: str) -> int:
        ptr = _lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise FlowsteerError(f"BPF object {self.path} has no map {name!r}")
        return int(ptr)

    def _prog_ptr(self, name: str) -> int:
        ptr = _lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise FlowsteerError(f"BPF object {self.path} has no program {name!r}")
        return int(ptr)

    def map_names(self) -> list[str]:
        """Returns the names of the object's maps (internal .bss/.data maps included)."""
        names, ptr = [], _lib.bpf_object__next_map(self._ptr, None)
        while ptr:
            names.append(_lib.bpf_map__name(ptr).decode())
            ptr = _lib.bpf_object__next_map(self._ptr, ptr)
        return names

    def map_spec(self, name: str) -> MapInfo:
        """Returns the definition of map ``name`` as compiled (id 0)."""
        return _map_definition(self._map_ptr(name), name)

    def inner_map_spec(self, name: str) -> MapInfo:
        """Returns the definition of the inner map of map-in-map ``name`` as compiled (id 0). Only before
        :meth:`load`: libbpf drops inner definitions when it loads. Raises FlowsteerError when ``name`` has
        no inner definition."""
        ptr = _lib.bpf_map__inner_map(self._map_ptr(name))
        if not ptr:
            raise FlowsteerError(f"map {name!r} of BPF object {self.path} has no inner map definition")
        return _map_definition(ptr, f"{name}.inner")

    def reuse_map(self, name: str, existing: Map) -> None:
        """Makes map ``name`` use ``existing`` instead of creating a new one at load time."""
        _check(_lib.bpf_map__reuse_fd(self._map_ptr(name), existing.fd), f"reuse map {name}")

    def set_max_entries(self, name: str, count: int) -> None:
        """Sets the size map ``name`` will be created with."""
        _check(_lib.bpf_map__set_max_entries(self._map_ptr(name), count), f"size map {name}")

    def set_attach_type(self, program: str, attach_type: AttachType) -> None:
        """Sets the expected attach type program ``program`` is loaded with."""
        _check(_lib.bpf_program__set_expected_attach_type(self._prog_ptr(program), int(attach_type)),
               f"attach type of {program}")

    def load(self) -> None:
        """Creates the maps and loads the programs; raises KernelError with the verifier's words."""
        with _capturing_log():
            _check(_lib.bpf_object__load(self._ptr), f"load BPF object {os.path.basename(self.path)}")

    def map(self, name: str) -> Map:
        """Returns an independent handle on loaded map ``name``."""
        fd = _check(_lib.bpf_map__fd(self._map_ptr(name)), f"map {name} fd")
        return Map(os.dup(fd))

    def program(self, name: str) -> Program:
        """Returns an independent handle on loaded program ``name``."""
        fd = _check(_lib.bpf_program__fd(self._prog_ptr(name)), f"program {name} fd")
        return Program(os.dup(fd))
