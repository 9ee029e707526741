"""`pip install .` without extras, in a fresh venv: `poller --help`, `poller once` against a
server and an import of every runtime module work, and `poller simulate` says how to install
the devtools extra instead of failing with a traceback."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from poller.devtools.simulator import SimulatedApi, SimulatorServer
from tests.engine_world import ACME, ACME_ADMINS, TOKEN, poller_env, seed_organizations
from tests.fixtures.smtp import SmtpTestServer

REPO = Path(__file__).resolve().parents[2]

# Imports every module of the installed package but the development tools and the scripts
# that run when imported (__main__; the migrations, which Alembic runs), then says where poller
# came from, how many modules it imported and whether any of them pulled in poller.devtools.
IMPORT_EVERY_MODULE = """
import importlib, pathlib, sys
import poller
root = pathlib.Path(poller.__file__).parent
# Read from the files: pkgutil.walk_packages would import every package it walks into.
names = [
    ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in sorted(root.rglob("*.py"))
]
runtime = [
    n for n in names
    if not n.startswith("poller.devtools")
    and not n.endswith(".__main__")
    and ".migrations." not in n
]
for name in runtime:
    importlib.import_module(name)
print(poller.__file__)
print(len(runtime))
print(sorted(m for m in sys.modules if m.startswith("poller.devtools")))
"""


def test_a_plain_install_works_without_the_devtools_extra(
    tmp_path: Path, smtp_server: SmtpTestServer
) -> None:
    wheel = _build_wheel(tmp_path / "wheel")
    python = _venv_with_runtime_dependencies(tmp_path / "venv", wheel)
    poller = python.parent / "poller"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLLER_", "PYTHON"))}

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args,
            env={**env, **extra_env},
            cwd=tmp_path,  # not the repository: only the installed package is importable
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    missing = run(str(python), "-c", "import aiohttp")
    assert "No module named 'aiohttp'" in missing.stderr  # the premise: no devtools extra

    imported = run(str(python), "-c", IMPORT_EVERY_MODULE)
    assert imported.returncode == 0, imported.stderr
    location, count, devtools = imported.stdout.splitlines()
    assert Path(location).is_relative_to(tmp_path / "venv")
    assert int(count) > 30
    assert devtools == "[]"

    helped = run(str(poller), "--help")
    assert helped.returncode == 0, helped.stderr
    assert "simulate" in helped.stdout

    simulate = run(str(poller), "simulate", "--orgs", "1")
    assert simulate.returncode == 2
    assert simulate.stderr == (
        "poller: error: the simulator needs the devtools extra: pip install 'poller[devtools]'\n"
    )

    api = SimulatedApi(token=TOKEN)
    seed_organizations(api)
    api.set_balance(ACME, "5.00")
    with SimulatorServer(api) as server:
        database = f"sqlite:///{tmp_path / 'poller.db'}"
        once = run(str(poller), "once", **poller_env(server.url, database, smtp_server.port))
    assert once.returncode == 0, once.stderr
    assert api.request_counts()["billing"] == len(api.org_ids())
    assert sorted(r for m in smtp_server.received for r in m.rcpt_tos) == sorted(ACME_ADMINS)


def _build_wheel(directory: Path) -> Path:
    """The wheel of a copy of the sources: setuptools would also pack whatever an earlier build
    left in the repository's build/ (modules since removed, for one)."""
    source = directory / "source"
    shutil.copytree(
        REPO / "poller", source / "poller", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy2(REPO / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build = subprocess.run(
        [*command, "-w", str(directory), str(source)], capture_output=True, text=True, check=False
    )
    assert build.returncode == 0, build.stderr
    [wheel] = directory.glob("poller-*.whl")
    return wheel


def _venv_with_runtime_dependencies(directory: Path, wheel: Path) -> Path:
    """A venv holding the wheel and, offline, only what its requirements without extras need:
    those distributions of this environment, linked into a directory a .pth file adds."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(directory)], check=True)
    python = directory / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["--no-index", str(wheel)],
        check=True,
    )
    linked = directory / "runtime-dependencies"
    linked.mkdir()
    for distribution in _runtime_closure(wheel):
        for top in {Path(str(file)).parts[0] for file in distribution.files or ()}:
            source = Path(str(distribution.locate_file(top)))
            if top not in ("..", "__pycache__") and source.exists() and not (linked / top).exists():
                (linked / top).symlink_to(source)
    [site_packages] = directory.glob("lib/python*/site-packages")
    (site_packages / "runtime-dependencies.pth").write_text(f"{linked}\n")
    return python


def _runtime_closure(wheel: Path) -> list[metadata.Distribution]:
    """The installed distributions the wheel's requirements (no extras) need, transitively."""
    with zipfile.ZipFile(wheel) as archive:
        [name] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        headers = email.parser.BytesParser().parsebytes(archive.read(name))
    # (requirement, the extras its requirer was asked for): no extras for poller itself.
    requires = headers.get_all("Requires-Dist") or []
    pending = [(Requirement(text), frozenset[str]()) for text in requires]
    found: dict[str, metadata.Distribution] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, extras = pending.pop()
        marker = requirement.marker
        if marker is not None and not any(marker.evaluate({"extra": e}) for e in extras or {""}):
            continue
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        distribution = found.setdefault(key[0], metadata.distribution(requirement.name))
        pending.extend((Requirement(text), key[1]) for text in distribution.requires or ())
    return list(found.values())
