"""Real servers under load fail no request: rolling restarts (SIGHUP) and the replacement of one worker
with the uvicorn and gunicorn recipes, with and without keep-alive; workers as `nobody`; a frozen worker
replaced by the health watchdog; an upgrade of the supervisor itself by socket handover."""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_reuseport_examples import EXAMPLES, supervised, wait_line

from flowsteer.reuseport import Group
from flowsteer.supervisor.identity import capabilities
from flowsteer.testing.load import HttpLoad

CASES = [  # recipe, GUNICORN_WORKER, keep-alive
    ("reuseport_uvicorn.py", None, False),
    ("reuseport_uvicorn.py", None, True),
    ("reuseport_gunicorn.py", "sync", False),
    ("reuseport_gunicorn.py", "uvicorn", True),
]


@pytest.mark.parametrize(("script", "worker", "keepalive"), CASES)
def test_restarts_of_real_servers_fail_no_request(netns: object, bpffs_root: str, script: str,
                                                  worker: str | None, keepalive: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if worker is not None:
        monkeypatch.setenv("GUNICORN_WORKER", worker)
    spec = "tcp:192.0.2.70:8100"
    with supervised(script, spec, 2, "--probe") as proc:
        group = Group(spec)
        first = [m.pid for m in group.members()]
        with HttpLoad("192.0.2.70", 8100, clients=8, keepalive=keepalive) as load:
            load.wait_for(100)
            proc.send_signal(signal.SIGHUP)  # rolling restart
            wait_line(proc, "restart finished")
            load.wait_for(100)
            second = [m.pid for m in group.members()]
            os.kill(second[0], signal.SIGTERM)  # one worker replaced on its own
            wait_line(proc, "worker 0 ready")
            load.wait_for(100)
        assert load.failures == []
        assert load.ok >= 300
        third = group.members()
        assert [m.state for m in third] == ["live", "live"]
        assert not set(first) & set(second) and third[0].pid not in second and third[1].pid == second[1]


def test_workers_run_as_nobody_without_capabilities(netns: object, bpffs_root: str) -> None:
    nobody = pwd.getpwnam("nobody")
    spec = "tcp:192.0.2.71:8101"
    with supervised("reuseport_uvicorn.py", spec, 2, "--user", "nobody", "--probe") as proc:
        group = Group(spec)
        with HttpLoad("192.0.2.71", 8101, clients=4) as load:
            load.wait_for(50)
            proc.send_signal(signal.SIGHUP)  # the supervisor joins the new sockets: workers need no privilege
            wait_line(proc, "restart finished")
            load.wait_for(50)
        assert load.failures == [] and load.ok >= 100
        for member in group.members():
            status = Path(f"/proc/{member.pid}/status").read_text()
            uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
            assert uids == [str(nobody.pw_uid)] * 4
            assert capabilities(member.pid) == {"effective": 0, "permitted": 0, "ambient": 0}
        assert os.stat(f"/proc/{proc.pid}").st_uid == 0  # the supervisor keeps its privilege


def test_a_frozen_worker_is_drained_and_replaced(netns: object, bpffs_root: str) -> None:
    spec = "tcp:192.0.2.72:8102"
    args = ("--probe", "--probe-interval", "0.2", "--probe-failures", "2", "--drain-timeout", "5")
    with supervised("reuseport_asyncio.py", spec, 3, *args) as proc:
        group = Group(spec)
        before = group.members()
        os.kill(before[1].pid, signal.SIGSTOP)
        seen = wait_line(proc, "worker 1 ready")
        assert any("did not answer its probe 2 times" in line for line in seen), seen
        after = group.members()
        assert [m.state for m in after] == ["live"] * 3
        assert [m.pid == b.pid for m, b in zip(after, before)] == [True, False, True]
        with HttpLoad("192.0.2.72", 8102, clients=4) as load:
            load.wait_for(100)
        assert load.failures == [] and load.ok >= 100


def test_a_new_supervisor_takes_the_sockets_over_without_a_failed_request(netns: object, bpffs_root: str,
                                                                       tmp_path: Path) -> None:
    spec = "tcp:192.0.2.73:8103"
    path = str(tmp_path / "handover")
    with contextlib.ExitStack() as stack:
        old = stack.enter_context(supervised("reuseport_uvicorn.py", spec, 2, "--offer", path, expect_stop=False))
        group = Group(spec)
        cookies = [m.cookie for m in group.members()]
        with HttpLoad("192.0.2.73", 8103, clients=8, keepalive=True) as load:
            load.wait_for(100)
            stack.enter_context(supervised("reuseport_uvicorn.py", spec, 2, "--take-over", path, "--offer", path))
            wait_line(old, "stopped")  # the old supervisor stops once the new one serves the sockets
            assert old.wait(30) == 0
            load.wait_for(100)
            members = group.members()
        assert load.failures == [] and load.ok >= 200
        assert [m.cookie for m in members] == cookies  # the very same sockets, never closed
        assert [m.state for m in members] == ["live", "live"]
        assert group.status()["counters"]["migrated"] == 0  # no queue was closed


@pytest.mark.parametrize(("args", "message"), [
    (("--take-over", "{tmp}/none"), "error: no socket handover offered at"),
    (("--user", "no-such-user-x"), "error: no user 'no-such-user-x'"),
    (("--workers", "0"), "error: 0 workers: a group has 1 to 256 members"),
])
def test_command_line_mistakes_are_errors(netns: object, bpffs_root: str, tmp_path: Path, args: tuple[str, ...],
                                          message: str) -> None:
    argv = [arg.format(tmp=tmp_path) for arg in args]
    proc = subprocess.run([sys.executable, str(EXAMPLES / "reuseport_asyncio.py"), "tcp:192.0.2.74:8104", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.startswith(message) and "Traceback" not in proc.stderr
