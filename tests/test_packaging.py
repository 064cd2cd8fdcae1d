"""What a downstream library pins: the sdist carries the whole test suite (not half of it), the
metadata declares the licence, Python versions and URLs, and the version agrees everywhere."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import peftkit

from helpers import pyproject

ROOT = Path(__file__).resolve().parents[1]
PROJECT = pyproject()


def _tracked() -> list[str]:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout (an unpacked sdist has no list of tracked files)")
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [line for line in done.stdout.splitlines() if (ROOT / line).is_file()]


def test_the_sdist_holds_every_tracked_file(tmp_path: Path) -> None:
    tracked = _tracked()
    tree = tmp_path / "tree"
    for name in tracked:  # build from a copy: the checkout gets no build leftovers
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    done = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path / "dist"), str(tree)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (archive,) = (tmp_path / "dist").glob("peftkit-*.tar.gz")
    assert archive.name == f"peftkit-{peftkit.__version__}.tar.gz"
    with tarfile.open(archive) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    missing = sorted(set(tracked) - members)
    assert not missing, f"the sdist leaves out tracked files (MANIFEST.in): {missing}"


def test_metadata_a_downstream_library_reads() -> None:
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    low = re.match(r">=3\.(\d+)", PROJECT["requires-python"])
    assert low is not None
    declared = {c.rsplit(" :: ", 1)[1] for c in PROJECT["classifiers"] if "Python :: 3." in c}
    assert min(declared, key=lambda v: int(v.split(".")[1])) == f"3.{low[1]}"
    assert PROJECT["urls"], "project URLs"


def test_the_changelog_names_this_release() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(
        rf"^## \[{re.escape(peftkit.__version__)}\] - \d{{4}}-\d\d-\d\d$", changelog, re.M
    )
