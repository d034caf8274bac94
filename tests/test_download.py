"""picogpt.download against a real HTTP server on 127.0.0.1 serving the TF-written fixture model."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_server import ModelServer, closed_port_url

from picogpt import download as dl

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
DATA = "model.ckpt.data-00000-of-00001"
FAST = dict(progress=False, retries=3, backoff=0.01, timeout=(2, 5))


@pytest.fixture
def server():
    if not (FIXTURE / DATA).is_file():
        pytest.skip("the fixture model tests/fixtures/gpt2-tiny is missing")
    # OpenAI publishes model.ckpt.meta too; serve a stand-in when the fixture has none.
    extra = {} if (FIXTURE / "model.ckpt.meta").is_file() else {"model.ckpt.meta": b"meta" * 100}
    with ModelServer(FIXTURE, extra_files=extra) as s:
        yield s


def served(server, name):
    return server.files[f"/124M/{name}"]


def assert_complete(server, folder):
    for name in dl.FILES:
        assert (folder / name).read_bytes() == served(server, name), name
    assert not list(folder.glob("*.part"))
    assert dl._is_verified(folder)


def test_download_fetches_every_file_then_the_cache_serves(server, tmp_path):
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    assert folder == tmp_path / "124M"
    assert_complete(server, folder)
    assert sorted(p for p, _ in server.requests) == sorted(f"/124M/{f}" for f in dl.FILES)
    assert all(r is None for _, r in server.requests)  # nothing to resume

    n = len(server.requests)
    assert dl.ensure_model("gpt2", tmp_path, server.url) == folder
    assert dl.download("124M", tmp_path, server.url, **FAST) == folder
    assert len(server.requests) == n  # the cache answered both


def test_dropped_connection_resumes_with_range(server, tmp_path):
    half = len(served(server, DATA)) // 2
    server.add_fault(DATA, ("drop", half))
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    assert_complete(server, folder)
    (_, first), (_, second) = server.requests_for(DATA)
    assert first is None
    # It asks for the rest of what it kept (up to the last whole chunk before the drop).
    assert second.startswith("bytes=") and 0 < int(second[6:-1]) <= half


def test_part_file_left_by_an_earlier_run_is_resumed(server, tmp_path):
    folder = tmp_path / "124M"
    folder.mkdir()
    head = served(server, DATA)[:1000]
    (folder / (DATA + ".part")).write_bytes(head)
    dl.download("124M", tmp_path, server.url, **FAST)
    assert_complete(server, folder)
    assert server.requests_for(DATA) == [(f"/124M/{DATA}", "bytes=1000-")]


def test_server_that_ignores_range_restarts_the_file_cleanly(server, tmp_path):
    server.ignore_range = True
    folder = tmp_path / "124M"
    folder.mkdir()
    # Wrong bytes in the .part: appending the 200 answer to them would corrupt the file.
    (folder / (DATA + ".part")).write_bytes(b"\xff" * 1000)
    dl.download("124M", tmp_path, server.url, **FAST)
    assert_complete(server, folder)
    assert server.requests_for(DATA) == [(f"/124M/{DATA}", "bytes=1000-")]


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    server.add_fault("hparams.json", ("status", 500), ("status", 503))
    t0 = time.monotonic()
    folder = dl.download("124M", tmp_path, server.url, **dict(FAST, backoff=0.2))
    assert time.monotonic() - t0 >= 0.2 + 0.4  # it waited between attempts
    assert_complete(server, folder)
    assert len(server.requests_for("hparams.json")) == 3


def test_persistent_server_errors_give_up_after_the_retries(server, tmp_path):
    server.always["vocab.bpe"] = ("status", 500)
    with pytest.raises(dl.DownloadError, match="HTTP 500"):
        dl.download("124M", tmp_path, server.url, **dict(FAST, retries=2))
    assert len(server.requests_for("vocab.bpe")) == 3
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert not dl._is_verified(tmp_path / "124M")


def test_missing_file_is_a_clear_error_without_retries(server, tmp_path):
    del server.files["/124M/encoder.json"]
    with pytest.raises(dl.DownloadError) as e:
        dl.download("124M", tmp_path, server.url, **FAST)
    assert f"{server.url}/124M/encoder.json" in str(e.value) and "404" in str(e.value)
    assert len(server.requests_for("encoder.json")) == 1


def test_corrupted_transfer_is_caught_removed_and_fetched_anew(server, tmp_path):
    server.add_fault(DATA, ("corrupt", len(served(server, DATA)) // 2))
    with pytest.raises(dl.DownloadError, match="verification") as e:
        dl.download("124M", tmp_path, server.url, **FAST)
    assert "model/" in str(e.value)  # names the damaged tensor
    folder = tmp_path / "124M"
    assert not (folder / DATA).exists()
    assert not dl._is_verified(folder)
    # The next run fetches what was removed and succeeds.
    before = len(server.requests)
    assert dl.ensure_model("124M", tmp_path, server.url) == folder
    assert_complete(server, folder)
    assert DATA in " ".join(p for p, _ in server.requests[before:])


def test_truncated_answer_is_not_renamed_into_place(server, tmp_path):
    server.always[DATA] = ("drop", 0)  # headers promise the file, no byte follows: no progress
    with pytest.raises(dl.DownloadError, match="giving up"):
        dl.download("124M", tmp_path, server.url, **dict(FAST, retries=1))
    assert not (tmp_path / "124M" / DATA).exists()


def test_offline_names_the_url_and_the_folder(tmp_path):
    url = closed_port_url()
    t0 = time.monotonic()
    with pytest.raises(dl.ModelNotFoundError) as e:
        dl.ensure_model("124M", tmp_path, url)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert f"{url}/124M" in msg and str(tmp_path / "124M") in msg and "by hand" in msg


def test_files_placed_by_hand_are_verified_once_and_used(tmp_path):
    if not (FIXTURE / DATA).is_file():
        pytest.skip("the fixture model is missing")
    folder = tmp_path / "124M"
    shutil.copytree(FIXTURE, folder)
    (folder / "model.ckpt.meta").unlink(missing_ok=True)  # optional: not fetched when absent
    assert dl.ensure_model("124M", tmp_path, closed_port_url()) == folder
    assert json.loads((folder / dl.VERIFIED).read_text())[DATA] == (folder / DATA).stat().st_size


def test_corrupt_files_placed_by_hand_are_refused_but_kept(tmp_path):
    if not (FIXTURE / DATA).is_file():
        pytest.skip("the fixture model is missing")
    folder = tmp_path / "124M"
    shutil.copytree(FIXTURE, folder)
    data = bytearray((folder / DATA).read_bytes())
    data[len(data) // 2] ^= 0x10
    (folder / DATA).write_bytes(bytes(data))
    with pytest.raises(dl.DownloadError, match="verification"):
        dl.ensure_model("124M", tmp_path, closed_port_url())
    assert (folder / DATA).exists()  # the user's file: reported, not deleted
    assert not dl._is_verified(folder)


def test_a_changed_file_invalidates_the_verification_record(server, tmp_path):
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    with open(folder / DATA, "ab") as f:
        f.write(b"x")
    assert not dl._is_verified(folder)


def test_unknown_size_is_rejected():
    with pytest.raises(dl.ModelNotFoundError, match="unknown GPT-2 size"):
        dl.ensure_model("125M")


def test_weights_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PICOGPT_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.weights_dir() == tmp_path / "home" / ".cache" / "picogpt"
    (tmp_path / "weights").mkdir()
    assert dl.weights_dir().resolve() == tmp_path / "weights"
    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path / "env"))
    assert dl.weights_dir() == tmp_path / "env"
    assert dl.weights_dir("~/w") == tmp_path / "home" / "w"


def test_two_processes_downloading_at_once_share_one_download(server, tmp_path):
    server.bytes_per_second = 200_000  # slow enough that the two runs overlap
    code = ("import sys; from picogpt.download import download; "
            "download('124M', sys.argv[1], sys.argv[2], progress=False)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), server.url], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert_complete(server, tmp_path / "124M")
    # Without the lock both would fetch every file; with it the second finds the work done.
    for name in dl.FILES:
        assert len(server.requests_for(name)) == 1, name
    assert sum("waiting" in e for e in errs) == 1


def test_a_part_file_longer_than_the_file_is_discarded(server, tmp_path):
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / ("vocab.bpe.part")).write_bytes(b"x" * (len(served(server, "vocab.bpe")) + 10))
    dl.download("124M", tmp_path, server.url, **FAST)
    assert_complete(server, folder)
    ranges = [r for _, r in server.requests_for("vocab.bpe")]
    assert ranges[0].startswith("bytes=") and ranges[1:] == [None]


def test_progress_line_only_on_a_terminal(server, tmp_path, capsys):
    dl.download("124M", tmp_path / "a", server.url, **dict(FAST, progress=True))
    err = capsys.readouterr().err
    line = [x for x in err.split("\r") if x.startswith(DATA)][-1]
    size = len(served(server, DATA)) / 1000
    assert f"{size:.1f} kB / {size:.1f} kB  100%" in line and "/s" in line
    dl.download("124M", tmp_path / "b", server.url, **dict(FAST, progress=None))
    err = capsys.readouterr().err  # captured: not a terminal, so no progress line
    assert "\r" not in err and "Downloading GPT-2 124M" in err
