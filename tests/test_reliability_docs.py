"""docs/reliability.md lists exactly the reliability corpus, with the right counts (and the README
quotes the right total)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
SELF_CHECKS = ("test_the_scanner_",)  # tests of the no-pickle scanner itself, not corpus cases


def _collected() -> dict[str, list[str]]:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    out = subprocess.run(
        [*command, "-m", "slow or not slow", "tests/reliability"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cases: dict[str, list[str]] = {}
    for line in out.splitlines():
        if line.startswith("tests/reliability/") and "::" in line:
            path, test = line.split("::", 1)
            if not test.startswith(SELF_CHECKS):
                cases.setdefault(Path(path).name, []).append(test)
    return cases


def _documented() -> dict[str, list[str]]:
    cases: dict[str, list[str]] = {}
    current = None
    for line in DOC.read_text().splitlines():
        heading = re.match(r"## .*`(test_\w+\.py)` \(\d+\)$", line)
        if heading:
            current = heading.group(1)
        row = re.match(r"\| `(test_[^`]+)` \|", line)
        if row and current:
            cases.setdefault(current, []).append(row.group(1))
    return cases


def test_the_reliability_page_lists_every_case_once_with_the_right_counts() -> None:
    collected, documented = _collected(), _documented()
    for name in sorted(collected.keys() | documented.keys()):
        got, listed = collected.get(name, []), documented.get(name, [])
        assert sorted(listed) == sorted(set(listed)), f"{name}: a case is listed twice"
        assert set(got) == set(listed), (
            f"{name}: undocumented {sorted(set(got) - set(listed))}, "
            f"listed but not collected {sorted(set(listed) - set(got))}"
        )
        assert f"`{name}` ({len(got)})" in DOC.read_text(), f"{name}: heading count"
    total = sum(len(v) for v in collected.values())
    slow = sum("300-kills" in t for v in collected.values() for t in v)
    assert f"**{total} cases** ({total - slow} in the default run, {slow} marked slow)" in (
        " ".join(DOC.read_text().split())
    )
    assert f"a corpus of {total} bad-input and crash cases" in (ROOT / "README.md").read_text()
