"""Install on a server (README): `make dist` builds a wheel that installs into a fresh virtualenv and runs.

Offline: the wheel is built with this environment's setuptools, and installed without its dependencies
(`cachingproxy --version` and config errors need none). That the dependencies it declares are the ones
pyproject.toml lists is checked in the wheel's metadata instead.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement

from cachingproxy import __version__

ROOT = Path(__file__).resolve().parent.parent


def make_recipe(target: str) -> list[str]:
    """The command lines of a Makefile target's recipe, as written."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_make_dist_builds_a_wheel_that_installs_into_a_fresh_venv_and_runs(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # `make dist`'s own command, without make (whose stamp rule could start an install inside the test).
    [command] = make_recipe("dist")
    argv = [sys.executable if arg == "$(BIN)/python" else arg.replace("$(DIST)", str(dist))
            for arg in shlex.split(command)]
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True, timeout=300)
    [wheel] = dist.glob("*.whl")
    assert wheel.name == f"cachingproxy-{__version__}-py3-none-any.whl"

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = Parser().parsestr(zf.read(f"cachingproxy-{__version__}.dist-info/METADATA").decode())
        entry_points = zf.read(f"cachingproxy-{__version__}.dist-info/entry_points.txt").decode()
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "cachingproxy").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped <= names  # every module, the dashboard, py.typed and the whole sample site
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime = [req for req in metadata.get_all("Requires-Dist") or [] if "extra ==" not in req]
    assert sorted(map(str, map(Requirement, runtime))) == sorted(map(str, map(Requirement, declared)))
    assert "cachingproxy = cachingproxy.__main__:main" in entry_points

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    subprocess.run([env / "bin" / "pip", "install", "--no-index", "--no-deps", "--quiet", wheel], check=True,
                   capture_output=True, timeout=300)
    version = subprocess.run([env / "bin" / "cachingproxy", "--version"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"cachingproxy {__version__}\n")
    # Runs from the installed copy, not this checkout; and a config error is one line and exit 2.
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = '8080'\n")
    served = subprocess.run([env / "bin" / "cachingproxy", "serve", "--config", bad], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert (served.returncode, served.stderr) == (2, f"cachingproxy: {bad}: server.port: must be int, got '8080'\n")
