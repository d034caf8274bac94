import configparser
import importlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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


SHIPPED = ["picogpt/tokenizers/gpt2/LICENSE", "picogpt/tokenizers/gpt2/encoder.json",
           "picogpt/tokenizers/gpt2/vocab.bpe"]


def test_the_licences_and_gpt2s_vocabulary_are_declared_for_the_wheel():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    licences = cfg["metadata"]["license_files"].split()
    assert licences == ["LICENSE", "picogpt/tokenizers/gpt2/LICENSE"]
    assert "MIT" in (ROOT / "LICENSE").read_text() and cfg["metadata"]["license"] == "MIT"
    assert "Copyright (c) 2019 OpenAI" in (ROOT / licences[1]).read_text(encoding="utf-8")
    pattern = cfg["options.package_data"]["picogpt.tokenizers"]
    package = ROOT / "picogpt" / "tokenizers"
    assert sorted(str(p.relative_to(ROOT)) for p in package.glob(pattern)) == SHIPPED


@pytest.mark.slow
def test_the_wheel_holds_both_licences_and_gpt2s_vocabulary(tmp_path):
    """`pip wheel` of a copy of the repository (the build writes beside its sources)."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "weights", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "--no-index", "-q", "-w", str(tmp_path / "wheel"), str(source)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "wheel").glob("picogpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert set(SHIPPED) <= set(names)
    licences = [n for n in names if ".dist-info/" in n and n.endswith("LICENSE")]
    assert len(licences) == 2, names  # picogpt's MIT notice and OpenAI's, in the metadata too


def test_every_exception_is_public():
    import inspect

    import picogpt
    from picogpt import errors

    family = [c for _, c in inspect.getmembers(errors, inspect.isclass)
              if issubclass(c, errors.PicogptError)]  # fmt: skip
    assert len(family) >= 10
    for cls in family:  # README's Errors section names them as picogpt.<name>
        assert getattr(picogpt, cls.__name__) is cls and cls.__name__ in picogpt.__all__
