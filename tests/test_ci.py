"""CI runs what README.md tells a new user to type, in a fresh virtual environment (`.ci/run`)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ci_lines():
    out = subprocess.run(["bash", ".ci/run", "--print"], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_ci_installs_and_tests_with_the_readme_lines():
    install, test = ci_lines()
    readme = (ROOT / "README.md").read_text()
    assert install == 'pip install torch==2.13.0 && pip install -e ".[dev]"'
    assert test == "python -m pytest"
    assert install in readme and test in readme


def test_ci_fails_where_the_readme_test_command_collects_nothing(tmp_path):
    """A real `.ci/run` (fresh venv, README's lines) on a project whose test command finds no tests: pytest exits 5,
    and so does CI."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "empty_tests").mkdir()
    (tmp_path / "empty_tests" / "conftest.py").write_text(
        "import pathlib, sys\npathlib.Path('prefix.txt').write_text(sys.prefix)\n"
    )
    (tmp_path / "README.md").write_text("```bash\npip install pytest\npython -m pytest empty_tests\n```\n")
    out = subprocess.run(["bash", ".ci/run"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 5, out.stdout + out.stderr
    assert "exited 5" in out.stderr
    prefix = (tmp_path / "prefix.txt").read_text()  # written by the conftest, inside CI's environment
    assert prefix != sys.prefix and prefix.endswith("/venv"), prefix


def test_the_installed_extra_holds_what_the_tests_import():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    dev = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extras["dev"]}
    needed = {"pytest", "captum", "scikit-learn", "peft"}  # captum: test_width_sweep; peft: test_lora
    assert needed <= dev, f"tests import {sorted(needed - dev)}, which README's install ('.[dev]') lacks"
