"""das-cli works from a wheel installed into a fresh virtualenv, with conf/ shipped inside it."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, TINY


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


def test_wheel_runs_in_a_fresh_virtualenv(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The venv sees this interpreter's packages (torch, transformers...) but not the checkout.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True)
    where = subprocess.run([str(python), "-c", "import das_cli.config as c; print(c.conf_dir())"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    work = tmp_path / "work"
    work.mkdir()
    args = ["model=tiny_gpt2", "layers=[1]", "positions=[last]"] + TINY
    result = subprocess.run([str(venv / "bin" / "das-cli"), *args], cwd=work, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    tables = list((work / "outputs").rglob("iia.csv"))
    assert len(tables) == 1 and len(pd.read_csv(tables[0])) == 1
