import subprocess
import sys


def test_python_dash_m_prints_help():
    out = subprocess.run([sys.executable, "-m", "picogpt", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "usage: picogpt" in out.stdout
