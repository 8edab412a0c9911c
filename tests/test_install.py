"""das-cli works from a wheel installed into a fresh virtualenv, with conf/ shipped inside it."""

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, TINY

pytestmark = pytest.mark.slow  # end to end: subprocesses, a wheel, the embedded model


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)], check=True)
    return next(out.glob("das_cli-*.whl"))


def test_wheel_ships_every_config(wheel):
    """Every config and every example dataset file (conf/examples/) is in the wheel."""
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.split("das_cli/conf/", 1)[1] for n in names if n.startswith("das_cli/conf/")}
    in_repo = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*") if p.is_file()}
    assert shipped == in_repo


def installed_package_dirs() -> list[str]:
    """Where this interpreter's packages live, whether it is a system, conda or virtualenv Python."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return list(dict.fromkeys(d for d in dirs if Path(d).is_dir()))


def fresh_venv(venv: Path) -> Path:
    """A virtualenv that sees this interpreter's packages (torch, transformers...) but not the checkout.

    `--system-site-packages` would give the base interpreter's packages, which inside a virtualenv
    lack everything installed into it; a .pth file listing this interpreter's package folders does
    not. Plain path lines add the folders after the venv's own, without running their .pth files,
    so an editable das-cli there stays out of sight.
    """
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    own = in_venv([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv)
    (Path(own.stdout.strip()) / "outer_packages.pth").write_text("\n".join(installed_package_dirs()) + "\n")
    return python


def in_venv(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run without PYTHONPATH, which may point at the checkout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def test_wheel_runs_in_a_fresh_virtualenv(wheel, tmp_path):
    venv = tmp_path / "venv"
    python = fresh_venv(venv)
    outer_torch = in_venv([str(python), "-c", "import torch; print(torch.__file__)"], tmp_path)
    assert outer_torch.stdout.strip() == torch.__file__, outer_torch.stderr  # this interpreter's torch
    install = in_venv([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], tmp_path)
    assert install.returncode == 0, install.stderr
    where = in_venv([str(python), "-c", "import das_cli.config as c; print(c.conf_dir())"], tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr
    work = tmp_path / "work"
    work.mkdir()
    args = ["model=tiny_gpt2", "layers=[1]", "positions=[last]"] + TINY
    result = in_venv([str(venv / "bin" / "das-cli"), *args], work)
    assert result.returncode == 0, result.stderr
    tables = list((work / "outputs").rglob("iia.csv"))
    assert len(tables) == 1 and len(pd.read_csv(tables[0])) == 1
