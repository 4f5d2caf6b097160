"""The kernel VM scripts name real tests: a renamed or removed smoke test fails here, on any kernel,
instead of only inside the VM."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def smoke_tests() -> list[str]:
    script = (ROOT / "scripts" / "test-kernels.sh").read_text()
    block = re.search(r"^smoke_tests=\((.*?)^\)", script, re.S | re.M)
    assert block, "scripts/test-kernels.sh has no smoke_tests=( ... ) list"
    return re.findall(r'"([^"]+)"', block.group(1))


def test_the_smoke_covers_every_hook_and_the_doctor() -> None:
    paths = [Path(node.split("::")[0]) for node in smoke_tests()]
    assert {path.parts[2] for path in paths if len(path.parts) > 3} == {"lookup", "reuseport", "divert"}
    assert Path("tests/system/test_doctor.py") in paths


def test_every_smoke_test_exists() -> None:
    for node in smoke_tests():
        path, name = node.split("::")
        function = name.split("[")[0]
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {function}\(", source, re.M), f"{node}: no test {function} in {path}"
        if "[" in name:
            params = name[name.index("[") + 1:-1].split("-")
            assert all(p in source for p in params), f"{node}: parameters {params} not in {path}"
