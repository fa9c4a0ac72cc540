"""Static checks that run with the suite: pyflakes' rules (unused or redefined
names, undefined names) over every Python module of the project. A merge left
two `Connection.peer` properties; this catches the next one."""
import shutil
import subprocess

from conftest import ROOT


def test_pyflakes_rules_are_clean():
    ruff = shutil.which("ruff") or str(ROOT / ".venv" / "bin" / "ruff")
    r = subprocess.run([ruff, "check", "--select", "F", "--no-cache", "--output-format", "concise",
                        "_core", "router", "gateway", "bench", "tests", "examples"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
