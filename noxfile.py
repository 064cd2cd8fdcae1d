"""Developer sessions: `nox -s tests lint typecheck` (and `slow`, `distributed`, `oldest`, `latest`,
`sdist`, `bench`, `docs`)."""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"


@nox.session
def tests(session: nox.Session) -> None:
    """The default test suite, with the benchmark extras so the peft and plot paths run too.

    CI installs only the test extra (see .ci/run); there those paths are skipped, not broken.
    """
    session.install(TORCH)
    session.install("-e", ".[test,bench]")
    session.run("pytest", *session.posargs)


@nox.session
def slow(session: nox.Session) -> None:
    """Tests marked slow, kept out of the default run."""
    session.install(TORCH)
    session.install("-e", ".[test]")
    session.run("pytest", "-m", "slow", *session.posargs)


# The tests that start several processes (DDP, FSDP2, DeepSpeed ZeRO-3), slow ones included.
DISTRIBUTED_TESTS = [
    "tests/test_trainer_distributed.py",
    "tests/test_trainer_fsdp2.py",
    "tests/test_fsdp2_kill_resume.py",
    "tests/test_zero3_shapes.py",
    "tests/test_deepspeed_zero3.py",
    "tests/test_examples.py",
]


@nox.session
def distributed(session: nox.Session) -> None:
    """The multi-process tests on CPU (gloo), with DeepSpeed installed (its CPU accelerator)."""
    session.install(TORCH)
    session.install("-e", ".[test,deepspeed]")
    session.env["DS_ACCELERATOR"] = "cpu"
    session.run("pytest", "-m", "slow or not slow", *DISTRIBUTED_TESTS, *session.posargs)


# The packages whose lowest declared version `oldest` installs: the runtime dependencies, and the
# libraries the suite checks interoperability against. Test tools (pytest, mkdocs...) float.
OLDEST_EXTRAS = ("peft", "accelerate")


@nox.session
def oldest(session: nox.Session) -> None:
    """The suite on the lowest versions pyproject declares (torch, transformers, safetensors, numpy,
    tqdm, peft, accelerate), pinned through a constraints file written from pyproject itself."""
    pins = _lower_bounds()
    constraints = Path(session.create_tmp()) / "oldest-constraints.txt"
    constraints.write_text("\n".join(pins) + "\n")
    session.log("pinned: " + ", ".join(pins))
    session.install("-c", str(constraints), "-e", ".[test]")
    for package, why in OLDEST_WITHOUT.items():
        session.log(f"uninstalling {package}: {why}")
        session.run("python", "-m", "pip", "uninstall", "-y", package)
    _report_versions(session)
    session.run("pytest", *session.posargs)


# Optional test packages that cannot run on the oldest torch; their tests skip there.
OLDEST_WITHOUT = {
    "torchao": "its releases for current torch fail to import on torch 2.6 "
    "(torch.utils._pytree.register_constant), and transformers imports torchao whenever it is "
    "installed, so every model class would fail to load",
}


@nox.session
def latest(session: nox.Session) -> None:
    """The suite on the newest releases pip resolves within the declared bounds (torch included)."""
    session.install("--upgrade", "--upgrade-strategy", "eager", "-e", ".[test]")
    _report_versions(session)
    session.run("pytest", *session.posargs)


@nox.session
def sdist(session: nox.Session) -> None:
    """Build the sdist, unpack it elsewhere and run its test suite from there."""
    import tarfile

    session.install("build>=1.0")
    tmp = Path(session.create_tmp()).resolve()
    session.run("python", "-m", "build", "--sdist", "--outdir", str(tmp / "dist"))
    (archive,) = sorted((tmp / "dist").glob("peftkit-*.tar.gz"))[-1:]
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (root,) = (tmp / "unpacked").iterdir()
    session.install(TORCH)
    session.install("-e", f"{root}[test]")
    session.chdir(root)
    session.run("pytest", *session.posargs)


def _lower_bounds() -> list[str]:
    """``name==X`` for every ``name>=X`` among the runtime dependencies and OLDEST_EXTRAS."""
    import re

    import tomllib

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for requirement in project["optional-dependencies"]["test"]:
        if re.match(rf"({'|'.join(OLDEST_EXTRAS)})\b", requirement):
            wanted.append(requirement)
    pins = []
    for requirement in wanted:
        found = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", requirement)
        if found is None:
            raise ValueError(f"{requirement!r} has no lower bound for `oldest` to install")
        pins.append(f"{found.group(1)}=={found.group(2)}")
    return pins


def _report_versions(session: nox.Session) -> None:
    names = ["torch", "transformers", "safetensors", "peft", "accelerate", "numpy", "tqdm"]
    code = "import importlib.metadata as m; print(', '.join(n + ' ' + m.version(n) for n in {names!r}))"
    session.run("python", "-c", code.format(names=names))


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("mypy", "src/peftkit")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark suite: speed and memory, parameter counts, injection time, SST-2 quality.

    Results land in benchmarks/results/. SST-2 is read from $SST2_DIR (default ../shared/data/sst2);
    without it the quality run is skipped. Extra arguments go to compare.py (e.g. --device cpu).
    """
    session.install(TORCH)
    session.install("-e", ".[bench]")
    session.run("python", "benchmarks/compare.py", "--vs-peft", *session.posargs)
    session.run("python", "benchmarks/params.py", "--vs-peft")
    session.run("python", "benchmarks/inject.py", "--vs-peft")
    data = Path(os.environ.get("SST2_DIR", "../shared/data/sst2"))
    if (data / "train.tsv").is_file():
        session.run("python", "benchmarks/quality.py", "--data", str(data), "--vs-peft")
    else:
        session.warn(f"no SST-2 at {data} (set SST2_DIR): skipping benchmarks/quality.py")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/, failing on any warning."""
    session.install(*_extra("docs"))  # mkdocs only: the site does not import peftkit
    session.run("mkdocs", "build", "--strict")


def _extra(name: str) -> list[str]:
    """The requirements of an optional-dependency group in pyproject.toml."""
    import tomllib

    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    requirements: list[str] = project["optional-dependencies"][name]
    return requirements
