"""The package as a user gets it: `python -m build` gives an sdist (sources, no objects) and a wheel with
the compiled BPF objects; installed into a fresh venv outside the repository, with no compiler on PATH,
the wheel's `flowsteer` loads the dispatcher and steers a real connection; `pip install .` of a clone
installs the objects too, and an installation that lacks one says so in one line.

`python -m build` uses the test venv's setuptools (--no-isolation: the build requirements pyproject.toml
names, already installed by the test extras); `pip install` of the clone builds in pip's usual isolated
environment, as a user's would. The fresh venvs get click and prometheus_client the way pip always
gets them (its cache, else the index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

import flowsteer
from flowsteer.testing.sockets import tcp_lands, tcp_listener

REPO = Path(__file__).resolve().parents[2]
OBJECTS = ("lookup.bpf.o", "reuseport.bpf.o", "reuseport-select.bpf.o")
EM_BPF = 247


def run(argv: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    assert proc.returncode == 0, f"{argv} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree's files that git tracks or would track (no build outputs), as a fresh clone has
    them (uncommitted changes included, so that the test checks what is being changed)."""
    target = tmp_path_factory.mktemp("clone")
    listing = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"])
    for name in filter(None, listing.split("\0")):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


@pytest.fixture(scope="module")
def dist(clone: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the sdist and the wheel that `python -m build` made of the clone."""
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(clone)])
    return out


def fresh_venv(path: Path, *requirements: str) -> dict[str, str]:
    """Makes a venv at ``path`` (outside the repository), installs ``requirements`` into it and returns
    an environment whose PATH holds only the venv's bin directory: no compiler is reachable."""
    run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    run([sys.executable, "-m", "pip", "--python", str(path / "bin" / "python"), "install", "-q", *requirements])
    env = {"PATH": str(path / "bin"), "FLOWSTEER_BPFFS": os.environ["FLOWSTEER_BPFFS"]}
    assert shutil.which("clang", path=env["PATH"]) is None
    return env


def installed_objects(env: Mapping[str, str], cwd: Path) -> Path:
    """Returns the directory the venv's flowsteer loads its BPF objects from."""
    code = "import os, flowsteer.lookup.state as s; print(os.path.dirname(s.object_path()))"
    return Path(run(["python", "-c", code], env=env, cwd=cwd).strip())


def test_sdist_carries_sources_and_wheel_carries_objects(dist: Path) -> None:
    (sdist,) = dist.glob("flowsteer-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {"setup.py", "scripts/build_bpf.py", "flowsteer/bpf/lookup.bpf.c",
            "flowsteer/bpf/reuseport.bpf.c", "flowsteer/divert/_nfqueue.c",
            "packaging/systemd/flowsteer.service"} <= names
    assert not [name for name in names if name.endswith((".bpf.o", ".so"))]

    (wheel,) = dist.glob("flowsteer-*-cp311-abi3-linux_*.whl")  # any CPython from 3.11: the stable ABI
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        for obj in OBJECTS:
            header = whl.read(f"flowsteer/bpf/{obj}")[:20]
            assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_BPF, obj
        assert whl.read("flowsteer/divert/_nfqueue.abi3.so")[:4] == b"\x7fELF"
    assert {"flowsteer/py.typed", "flowsteer/divert/_nfqueue.pyi"} <= names
    assert f"flowsteer-{flowsteer.__version__}.data/data/share/flowsteer/systemd/flowsteer.service" in names


def test_installed_wheel_steers_a_connection_without_a_compiler(dist: Path, netns: object, bpffs_root: str,
                                                                tmp_path: Path) -> None:
    (wheel,) = dist.glob("flowsteer-*.whl")
    env = fresh_venv(tmp_path / "venv", str(wheel))
    assert installed_objects(env, tmp_path).is_relative_to(tmp_path / "venv")
    assert run(["flowsteer", "--version"], env=env, cwd=tmp_path).strip() == f"flowsteer {flowsteer.__version__}"
    versions = json.loads(run(["flowsteer", "version", "--json"], env=env, cwd=tmp_path))
    assert versions["flowsteer"] == flowsteer.__version__ and versions["kernel"] == os.uname().release
    assert versions["libbpf"]
    code = "import flowsteer.divert._nfqueue as m; print(m.__file__)"  # the divert socket's compiled part
    assert Path(run(["python", "-c", code], env=env, cwd=tmp_path).strip()).is_relative_to(tmp_path / "venv")

    run(["flowsteer", "load"], env=env, cwd=tmp_path)
    run(["flowsteer", "bind", "web", "tcp", "192.0.2.0/24", "80"], env=env, cwd=tmp_path)
    with tcp_listener() as web:
        port = web.getsockname()[1]
        run(["flowsteer", "register-pid", str(os.getpid()), "web", "tcp", "127.0.0.1", str(port)],
            env=env, cwd=tmp_path)
        assert tcp_lands({"web": web}, "192.0.2.9", 80) == "web"
    run(["flowsteer", "unload"], env=env, cwd=tmp_path)


def test_pip_install_of_a_clone_installs_the_objects(clone: Path, netns: object, bpffs_root: str,
                                                     tmp_path: Path) -> None:
    cache = clone / "examples" / "__pycache__"  # an example was run in the clone: its bytecode is no example
    cache.mkdir(exist_ok=True)
    (cache / "reuseport_asyncio.cpython-311.pyc").write_bytes(b"")
    env = fresh_venv(tmp_path / "venv", str(clone))
    objects = installed_objects(env, tmp_path)
    assert objects.is_relative_to(tmp_path / "venv")
    assert all((objects / obj).is_file() for obj in OBJECTS)
    assert (tmp_path / "venv" / "share" / "flowsteer" / "examples" / "host.toml").is_file()
    run(["flowsteer", "load"], env=env, cwd=tmp_path)
    run(["flowsteer", "unload"], env=env, cwd=tmp_path)

    (objects / "lookup.bpf.o").unlink()  # a broken installation: one clear line
    proc = subprocess.run(["flowsteer", "load"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"flowsteer: error: the BPF object lookup.bpf.o is not installed (looked in "
                                  f"{objects})")
