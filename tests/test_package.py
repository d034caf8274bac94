import configparser
import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_python_dash_m_prints_help():
    cmd = [sys.executable, "-m", "picogpt", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: picogpt" in out.stdout


def test_version_matches_the_package():
    import picogpt

    out = subprocess.run([sys.executable, "-m", "picogpt", "--version"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"picogpt {picogpt.__version__}"


def test_the_console_script_points_at_a_callable_main():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    scripts = [line.split("=") for line in
               cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    targets = {name.strip(): target.strip() for name, target in scripts}
    module, function = targets["picogpt"].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_set_threads_is_public():
    import picogpt
    from picogpt.gpt2 import parallel

    assert "set_threads" in picogpt.__all__
    before = picogpt.set_threads(2)
    try:
        assert parallel.threads() == 2
    finally:
        picogpt.set_threads(before)
