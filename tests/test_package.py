import subprocess
import sys


def test_python_dash_m_prints_help():
    cmd = [sys.executable, "-m", "picogpt", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: picogpt" in out.stdout
