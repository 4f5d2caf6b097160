"""Kernel features: how a missing one is named, which object a hook loads without it, what gets built."""

from __future__ import annotations

import errno
import importlib.util
import os
import struct
from pathlib import Path

import pytest

import flowsteer.bpf
from flowsteer.errors import MissingFeature, PermissionDenied
from flowsteer.kernel import features
from flowsteer.lookup import state as lookup_state
from flowsteer.reuseport import state as reuseport_state

ROOT = Path(__file__).resolve().parents[2]


def _build_bpf():  # scripts/ is not a package: load it as setup.py does
    spec = importlib.util.spec_from_file_location("build_bpf", ROOT / "scripts" / "build_bpf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> set[features.Feature]:
    """The features the 'running kernel' has: the test fills the set; probes are not run."""
    have: set[features.Feature] = set()
    monkeypatch.setattr(features, "present", lambda feature: feature in have)
    return have


def test_missing_message_names_the_feature_and_its_first_release() -> None:
    assert features.missing_message(features.SK_LOOKUP, "loading the lookup dispatcher") == (
        "loading the lookup dispatcher needs BPF sk_lookup programs (BPF_PROG_TYPE_SK_LOOKUP), which this "
        "kernel lacks: it came in Linux 5.9")


def test_require_raises_missing_feature_with_eopnotsupp(kernel: set[features.Feature]) -> None:
    with pytest.raises(MissingFeature) as caught:
        features.require(features.REUSEPORT_MIGRATION, "restarting")
    assert caught.value.errno == errno.EOPNOTSUPP
    assert str(caught.value).startswith("restarting needs migration of a closing listener's requests")
    assert "Linux 5.14" in str(caught.value)
    kernel.add(features.REUSEPORT_MIGRATION)
    features.require(features.REUSEPORT_MIGRATION, "restarting")


def test_every_probed_feature_has_a_probe_and_a_release() -> None:
    assert set(features.PROBED) == {features.SK_LOOKUP, features.REUSEPORT_MIGRATION, features.XDP_LIVE_FRAMES}
    assert [f.since for f in features.PROBED] == ["5.9", "5.14", "5.18"]


def test_reuseport_falls_back_to_the_select_only_object(kernel: set[features.Feature]) -> None:
    assert os.path.basename(reuseport_state.object_path()) == "reuseport-select.bpf.o"
    kernel.add(features.REUSEPORT_MIGRATION)
    assert os.path.basename(reuseport_state.object_path()) == "reuseport.bpf.o"


def test_lookup_has_no_fallback_but_requires_sk_lookup(kernel: set[features.Feature]) -> None:
    assert os.path.basename(lookup_state.object_path()) == "lookup.bpf.o"
    assert lookup_state.SPEC.requires == (features.SK_LOOKUP,)


def test_create_refuses_before_changing_anything(kernel: set[features.Feature], tmp_path: Path) -> None:
    touched = []
    with pytest.raises(MissingFeature, match="loading the lookup dispatcher needs BPF sk_lookup"):
        lookup_state.SPEC.create(str(tmp_path), str(tmp_path / "state"), lambda obj, tmp: touched.append(tmp))
    assert touched == [] and list(tmp_path.iterdir()) == []


def test_unprivileged_callers_read_with_the_primary_object(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(feature: features.Feature) -> bool:
        raise PermissionDenied("load program fs_probe_migrate", errno.EPERM)
    monkeypatch.setattr(features, "present", refuse)
    assert os.path.basename(reuseport_state.object_path()) == "reuseport.bpf.o"


def test_probe_program_reads_migrating_sk_and_passes() -> None:
    decoded = [struct.unpack("<BBhi", features._READ_MIGRATING_SK[i:i + 8]) for i in range(0, 24, 8)]
    assert decoded == [(0x79, 0x12, 48, 0),  # r2 = *(u64 *)(r1 + 48): dst r2 in the low nibble, src r1
                       (0xB7, 0x00, 0, 1),   # r0 = 1 (SK_PASS)
                       (0x95, 0x00, 0, 0)]   # exit


def test_build_lists_each_source_and_the_select_only_variant(tmp_path: Path) -> None:
    build_bpf = _build_bpf()
    source_dir = os.path.dirname(flowsteer.bpf.__file__)
    objects = build_bpf.objects(source_dir, str(tmp_path))
    assert [(os.path.basename(s), os.path.basename(o), d) for s, o, d in objects] == [
        ("lookup.bpf.c", "lookup.bpf.o", ()),
        ("reuseport.bpf.c", "reuseport.bpf.o", ()),
        ("reuseport.bpf.c", "reuseport-select.bpf.o", ("FLOWSTEER_SELECT_ONLY",)),
    ]
    assert all(os.path.dirname(o) == str(tmp_path) for _, o, _ in objects)


@pytest.mark.parametrize("refusal, answer", [(errno.EINVAL, False), (None, True)])
def test_live_frames_probe_reads_einval_as_absent(monkeypatch: pytest.MonkeyPatch, refusal: int | None,
                                                  answer: bool) -> None:
    from flowsteer.errors import kernel_error
    from flowsteer.kernel import live_frames

    def test_run(verdict: int, frame: bytes, ifindex: int, what: str) -> None:
        assert verdict == live_frames.XDP_DROP and ifindex == 1  # dropped on lo: nothing is delivered
        if refusal is not None:
            raise kernel_error(what, refusal)

    monkeypatch.setattr(live_frames, "_test_run", test_run)
    assert live_frames.supported() is answer


def test_live_frames_probe_passes_other_refusals_on(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowsteer.errors import KernelError, kernel_error
    from flowsteer.kernel import live_frames

    def refused(*_args: object) -> None:
        raise kernel_error("probing", errno.EPERM)

    monkeypatch.setattr(live_frames, "_test_run", refused)
    with pytest.raises(KernelError) as caught:
        live_frames.supported()
    assert caught.value.errno == errno.EPERM
