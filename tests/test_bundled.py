"""The bundled model, shakespeare-char: in the package, small, offline, and trained."""

import json
import os
import re
import subprocess
import sys

import pytest

import picogpt

FOLDER = picogpt.BUNDLED / "shakespeare-char"

# The end of Tiny Shakespeare (The Tempest, II.1): inside the validation split, never trained on.
HELD_OUT = """\
SEBASTIAN:
What, art thou waking?

ANTONIO:
Do you not hear me speak?

SEBASTIAN:
I do; and surely
It is a sleepy language and thou speak'st
Out of thy sleep. What is it thou didst say?
This is a strange repose, to be asleep
With eyes wide open; standing, speaking, moving,
And yet so fast asleep.

ANTONIO:
Noble Sebastian,
Thou let'st thy fortune sleep--die, rather; wink'st
Whiles thou art waking.
"""


def offline_env(tmp_path):
    """No weights folder, and nothing listening where models would be downloaded from."""
    return dict(os.environ, PICOGPT_WEIGHTS=str(tmp_path / "empty"),
                PICOGPT_BASE_URL="http://127.0.0.1:9", PYTHONIOENCODING="utf-8")  # fmt: skip


def test_it_ships_small_with_its_training_record():
    files = [p for p in FOLDER.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 10_000_000
    config = json.loads((FOLDER / "train_config.json").read_text())
    assert config["command"].startswith("picogpt train ")
    log = [json.loads(line) for line in (FOLDER / "train_log.jsonl").read_text().splitlines()]
    assert min(r["val_loss"] for r in log) <= 1.65
    assert "picogpt train" in (FOLDER / "README.md").read_text()


def test_load_by_name_and_generate_in_its_vocabulary():
    model = picogpt.load("shakespeare-char")
    assert model.hparams["n_vocab"] == 65
    text = model.generate("ROMEO:", n=300, seed=0)
    assert len(text) == 300 and set(text) <= set(model.tokenizer.chars)


def test_the_command_line_generates_offline(tmp_path):
    out = subprocess.run([sys.executable, "-m", "picogpt", "--model", "shakespeare-char",
                          "ROMEO:", "--n", "300", "--seed", "1"], capture_output=True, text=True,
                         env=offline_env(tmp_path), timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ROMEO:") and len(out.stdout.rstrip("\n")) >= len("ROMEO:") + 250
    assert not (tmp_path / "empty").exists()  # nothing was downloaded or created


def test_it_predicts_unseen_shakespeare(tmp_path):
    """An untrained model scores ln(65) = 4.17 nats per character; the trained one far less."""
    passage = tmp_path / "tempest.txt"
    passage.write_text(HELD_OUT, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "picogpt", "eval", str(passage), "--model",
                          "shakespeare-char"], capture_output=True, text=True,
                         env=offline_env(tmp_path), timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    nats = float(re.search(r"cross-entropy:\s+([\d.]+)", out.stdout).group(1))
    assert nats < 1.8


@pytest.mark.parametrize("name", ["shakespeare-char", str(FOLDER)])
def test_chat_with_it_through_a_pipe(tmp_path, name):
    out = subprocess.run([sys.executable, "-m", "picogpt", "chat", "--model", name, "--n", "60",
                          "--seed", "3"], input="What news from Verona?\n", capture_output=True,
                         text=True, env=offline_env(tmp_path), timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("you> What news from Verona?\n")
