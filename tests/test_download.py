"""picogpt.hub.download against a real HTTP server on 127.0.0.1 serving the TF-written fixture
model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_server import HubServer, ModelServer, closed_port_url

from picogpt.hub import download as dl
from picogpt.hub import sources
from picogpt.tokenizers import GPT2_VOCABULARY

FIXTURE = Path(__file__).parent / "fixtures" / "gpt2-tiny"
DATA = "model.ckpt.data-00000-of-00001"
MB = 1 << 20
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
    for name in sources.FILES:
        assert (folder / name).read_bytes() == served(server, name), name
    assert not list(folder.glob("*.part"))
    assert dl.verified_source(folder)


def test_download_fetches_every_file_then_the_cache_serves(server, tmp_path):
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    assert folder == tmp_path / "124M"
    assert_complete(server, folder)
    assert sorted(p for p, _ in server.requests) == sorted(f"/124M/{f}" for f in sources.FILES)
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
    assert not dl.verified_source(tmp_path / "124M")


def test_missing_file_is_a_clear_error_without_retries(server, tmp_path):
    del server.files["/124M/encoder.json"]
    with pytest.raises(dl.DownloadError) as e:
        dl.download("124M", tmp_path, server.url, **FAST)
    assert f"{server.url}/124M/encoder.json" in str(e.value) and "404" in str(e.value)
    assert len(server.requests_for("encoder.json")) == 1


def test_a_mirror_without_the_tf_graph_is_enough(server, tmp_path, capsys):
    del server.files["/124M/model.ckpt.meta"]  # OpenAI's TF graph: loading never reads it
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    assert dl.verified_source(folder) and not (folder / "model.ckpt.meta").exists()
    assert "model.ckpt.meta is not at" in capsys.readouterr().err
    for name in sources.NEEDED:
        assert (folder / name).read_bytes() == served(server, name), name


def test_offline_a_model_without_only_the_tf_graph_is_ready(server, tmp_path, capsys):
    del server.files["/124M/model.ckpt.meta"]
    folder = dl.download("124M", tmp_path, server.url, **FAST)  # complete but for the graph
    capsys.readouterr()
    assert dl.download("124M", tmp_path, closed_port_url(), **FAST) == folder  # offline now
    assert "model.ckpt.meta cannot be fetched" in capsys.readouterr().err
    assert dl.verified_source(folder) and not (folder / "model.ckpt.meta").exists()
    (folder / "encoder.json").unlink()  # a file loading needs: offline, that is an error
    with pytest.raises(dl.ModelNotFoundError, match="cannot be downloaded"):
        dl.download("124M", tmp_path, closed_port_url(), **FAST)


def test_corrupted_transfer_is_caught_removed_and_fetched_anew(server, tmp_path):
    server.add_fault(DATA, ("corrupt", len(served(server, DATA)) // 2))
    with pytest.raises(dl.DownloadError, match="verification") as e:
        dl.download("124M", tmp_path, server.url, **FAST)
    assert "model/" in str(e.value)  # names the damaged tensor
    folder = tmp_path / "124M"
    assert not (folder / DATA).exists()
    assert not dl.verified_source(folder)
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
    stamp = json.loads((folder / dl.VERIFIED).read_text())["files"]
    assert stamp[DATA]["size"] == (folder / DATA).stat().st_size
    assert stamp[DATA]["check"] == "crc32c"  # (the fixture's vocabulary is not GPT-2's: no pin)
    assert set(stamp) == set(sources.NEEDED)


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
    assert not dl.verified_source(folder)


def test_a_changed_file_invalidates_the_verification_record(server, tmp_path):
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    with open(folder / DATA, "ab") as f:
        f.write(b"x")
    assert not dl.verified_source(folder)


def test_unknown_size_is_rejected():
    with pytest.raises(dl.ModelNotFoundError, match="unknown GPT-2 size"):
        dl.ensure_model("125M")


def test_weights_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PICOGPT_WEIGHTS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sources.weights_dir() == tmp_path / "home" / ".cache" / "picogpt"
    (tmp_path / "weights").mkdir()
    assert sources.weights_dir().resolve() == tmp_path / "weights"
    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path / "env"))
    assert sources.weights_dir() == tmp_path / "env"
    assert sources.weights_dir("~/w") == tmp_path / "home" / "w"


def test_two_processes_downloading_at_once_share_one_download(server, tmp_path):
    server.bytes_per_second = 200_000  # slow enough that the two runs overlap
    code = ("import sys; from picogpt.hub.download import download; "
            "download('124M', sys.argv[1], sys.argv[2], progress=False)")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), server.url], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=60)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert_complete(server, tmp_path / "124M")
    # Without the lock both would fetch every file; with it the second finds the work done.
    for name in sources.FILES:
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


# --- misbehaving mirrors: every download ends, with one clear error ------------------------------

def test_a_mirror_that_cuts_every_answer_at_half_ends(server, tmp_path):
    server.always[DATA] = ("half",)  # Range is honoured: each answer brings half of what is left
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match="failed attempts in this download"):
        dl.download("124M", tmp_path, server.url, **dict(FAST, attempts=8))
    assert time.monotonic() - t0 < 10
    assert len(server.requests_for(DATA)) == 8
    part = tmp_path / "124M" / (DATA + ".part")
    assert 0 < part.stat().st_size < len(served(server, DATA))  # kept, to resume next time
    assert not dl.verified_source(tmp_path / "124M")


def test_a_mirror_that_cuts_at_half_and_ignores_range_ends(server, tmp_path):
    server.always[DATA] = ("half",)
    server.ignore_range = True  # every answer starts again at byte 0 and stops at half
    with pytest.raises(dl.DownloadError, match="nothing new"):
        dl.download("124M", tmp_path, server.url, **FAST)
    assert len(server.requests_for(DATA)) == 1 + 1 + FAST["retries"]  # progress, then stuck


@pytest.mark.parametrize("fault, message", [
    (("length", 10**15), "1.0 PB; such a file is at most"),
    (("dup-length",), "Content-Length contained multiple unmatching values"),
    (("loop",), "more than 10 redirects"),
    (("redirect", "ftp://127.0.0.1/x"), "unusable"),
    (("encoding", "br"), "br-encoded"),
])
def test_answers_that_cannot_be_right_are_refused_at_once(server, tmp_path, fault, message):
    server.always[DATA] = fault
    with pytest.raises(dl.DownloadError, match=message):
        dl.download("124M", tmp_path, server.url, **FAST)
    if fault[0] not in ("loop", "redirect"):
        assert len(server.requests_for(DATA)) == 1  # not retried: it would only repeat
    assert not (tmp_path / "124M" / DATA).exists()


def test_identity_is_asked_for_and_a_gzip_body_is_decoded(server, tmp_path):
    server.add_fault(DATA, ("gzip",))
    server.add_fault("vocab.bpe", ("gzip",))
    folder = dl.download("124M", tmp_path, server.url, **FAST)
    assert_complete(server, folder)
    assert all(h.get("Accept-Encoding") == "identity" for h in server.headers_seen)


def test_a_gzip_bomb_is_refused_without_inflating_it(server, tmp_path):
    import tracemalloc

    server.files["/124M/hparams.json"] = bytes(64 * MB)  # about 64 kB compressed
    server.always["hparams.json"] = ("gzip",)
    tracemalloc.start()
    try:
        with pytest.raises(dl.DownloadError, match="sends more than the 65.5 kB such a file"):
            dl.download("124M", tmp_path, server.url, **FAST)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MB


def test_a_gzip_body_after_a_range_request_starts_the_file_over(server, tmp_path):
    folder = tmp_path / "124M"
    folder.mkdir()
    (folder / (DATA + ".part")).write_bytes(served(server, DATA)[:1000])
    server.add_fault(DATA, ("gzip",))  # a range of compressed bytes cannot be appended
    dl.download("124M", tmp_path, server.url, **FAST)
    assert_complete(server, folder)
    assert [r for _, r in server.requests_for(DATA)] == ["bytes=1000-", None]


def test_a_bad_gzip_body_is_retried_then_refused(server, tmp_path):
    server.always["vocab.bpe"] = ("bad-gzip",)
    with pytest.raises(dl.DownloadError, match="compressed data is corrupt"):
        dl.download("124M", tmp_path, server.url, **FAST)
    assert len(server.requests_for("vocab.bpe")) == 1 + FAST["retries"]
    assert not (tmp_path / "124M" / "vocab.bpe").exists()


def test_a_trickle_is_a_stall(server, tmp_path):
    server.always["hparams.json"] = ("trickle", 0.05)  # 20 bytes a second
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match="stalled"):
        dl.download("124M", tmp_path, server.url, **dict(FAST, retries=1, timeout=(2, 0.4)))
    assert time.monotonic() - t0 < 5
    assert len(server.requests_for("hparams.json")) == 2


def test_headers_then_nothing_is_a_stall(server, tmp_path):
    server.always["hparams.json"] = ("silent",)
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match="timed out"):
        dl.download("124M", tmp_path, server.url, **dict(FAST, retries=1, timeout=(2, 0.4)))
    assert time.monotonic() - t0 < 5


def test_the_whole_download_has_a_deadline(server, tmp_path):
    server.always[DATA] = ("trickle", 0.01)  # alive enough not to stall a 10 s window
    t0 = time.monotonic()
    with pytest.raises(dl.DownloadError, match="did not finish within 1.5 s") as e:
        dl.download("124M", tmp_path, server.url, **dict(FAST, timeout=(2, 10), deadline=1.5))
    assert time.monotonic() - t0 < 5
    assert "run the same command again to resume" in str(e.value)
    assert (tmp_path / "124M" / (DATA + ".part")).stat().st_size > 0  # kept


def test_a_content_length_that_is_short_is_caught_by_verification(server, tmp_path):
    server.add_fault("hparams.json", ("length", 10))  # says 10 bytes: the client reads 10
    with pytest.raises(dl.DownloadError, match="hparams.json is not valid JSON"):
        dl.download("124M", tmp_path, server.url, **FAST)
    assert not (tmp_path / "124M" / "hparams.json").exists()
    assert_complete(server, dl.ensure_model("124M", tmp_path, server.url))


def test_no_content_length_is_bounded_by_what_the_file_can_be(server, tmp_path):
    server.files["/124M/hparams.json"] = b" " * (sources.max_bytes("124M", "hparams.json") + 1)
    server.always["hparams.json"] = ("no-length",)
    with pytest.raises(dl.DownloadError, match="sends more than the 65.5 kB such a file can be"):
        dl.download("124M", tmp_path, server.url, **FAST)


def test_size_limits_hold_gpt2s_real_files():
    # The real sizes of OpenAI's and the hub's largest files, by size.
    real = {"124M": 548_105_171, "355M": 1_520_013_706, "774M": 3_247_202_234,
            "1558M": 6_431_878_936}  # model.safetensors; OpenAI's data files are smaller
    for size, n in real.items():
        assert n < sources.max_bytes(size, "model.safetensors") < 2 * n
        assert sources.max_bytes(size, sources.DATA) == sources.max_bytes(size, "model.safetensors")
    assert sources.max_bytes("124M", "encoder.json") > 1_042_301
    assert sources.max_bytes("124M", "vocab.bpe") > 456_318


# --- bad base URLs --------------------------------------------------------------------------------

BAD_URLS = ["ftp://example.com/models", "127.0.0.1:1/x", "http://[::1/x", "http://127.0.0.1:99999",
            "http://", "localhost:8000", "http://host/x?y=1", "http://ho st/", "http://h:0/"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_a_base_url_that_is_not_http_is_refused(url, tmp_path):
    with pytest.raises(dl.DownloadError, match="not an http"):
        dl.ensure_model("124M", tmp_path, url)
    assert not (tmp_path / "124M").exists()


def test_good_base_urls_pass():
    assert sources.check_base_url("http://127.0.0.1:8000/models/") == "http://127.0.0.1:8000/models"
    assert sources.check_base_url("HTTPS://[::1]:443") == "HTTPS://[::1]:443"


# --- the folder: read-only, full ------------------------------------------------------------------

def _run(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture
def immutable(tmp_path):
    """A model folder nobody may write in, root included (chattr +i): EPERM, a PermissionError."""
    folder = tmp_path / "weights" / "124M"
    folder.mkdir(parents=True)
    out = _run("chattr", "+i", str(folder))
    if out.returncode:
        pytest.skip(f"chattr +i is not possible here: {out.stderr.strip()}")
    yield folder
    _run("chattr", "-i", str(folder))


@pytest.fixture
def mount_point(tmp_path):
    """Mount something on a fresh folder for one test (root only), unmounted afterwards."""
    mounted = []

    def mount(target, *args):
        target.mkdir(parents=True, exist_ok=True)
        out = _run("mount", *args, str(target))
        if out.returncode:
            pytest.skip(f"cannot mount here: {out.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        _run("umount", str(target))


def test_a_folder_that_cannot_be_written_is_one_line(server, immutable):
    with pytest.raises(dl.DownloadError, match="cannot write in .*124M .*Operation not permitted"):
        dl.download("124M", immutable.parent, server.url, **FAST)
    assert server.requests == []


def test_a_read_only_mount_is_one_line_and_a_model_there_still_loads(server, tmp_path,
                                                                    mount_point):
    src = tmp_path / "src"
    src.mkdir()
    ro = mount_point(tmp_path / "ro", "--bind", str(src))
    out = _run("mount", "-o", "remount,bind,ro", str(ro))
    if out.returncode:
        pytest.skip(f"cannot remount read-only: {out.stderr.strip()}")
    with pytest.raises(dl.DownloadError, match="cannot write in .*Read-only file system"):
        dl.download("124M", ro, server.url, **FAST)
    # A whole model already there (placed by hand) is checked and used, but not recorded.
    shutil.copytree(FIXTURE, src / "124M", ignore=shutil.ignore_patterns(dl.VERIFIED))
    assert dl.ensure_model("124M", ro, server.url) == ro / "124M"
    assert not (src / "124M" / dl.VERIFIED).exists()
    assert server.requests == []


def test_a_full_disk_is_refused_before_streaming(server, tmp_path, mount_point):
    small = mount_point(tmp_path / "small", "-t", "tmpfs", "-o", "size=128k", "tmpfs")
    with pytest.raises(dl.DownloadError, match="needs 175.7 kB more, the device has"):
        dl.download("124M", small, server.url, **FAST)
    assert not (small / "124M" / DATA).exists()


def test_a_disk_that_fills_up_midway_is_one_line_and_resumes(server, tmp_path, mount_point):
    small = mount_point(tmp_path / "small", "-t", "tmpfs", "-o", "size=128k", "tmpfs")
    server.always[DATA] = ("no-length",)  # nothing to check the free space against up front
    with pytest.raises(dl.DownloadError, match="no space left on the device") as e:
        dl.download("124M", small, server.url, **FAST)
    assert "resumes where it stopped" in str(e.value)
    part = small / "124M" / (DATA + ".part")
    kept = part.stat().st_size
    assert kept > 0
    for name in ("checkpoint", "encoder.json", "hparams.json"):  # what arrived stays
        assert (small / "124M" / name).read_bytes() == served(server, name)
    # With room again, the next run resumes the file and completes.
    assert _run("mount", "-o", "remount,size=2m", str(small)).returncode == 0
    del server.always[DATA]
    folder = dl.download("124M", small, server.url, **FAST)
    assert_complete(server, folder)
    assert server.requests_for(DATA)[-1][1] == f"bytes={kept}-"


# --- GPT-2's tokenizer is pinned ------------------------------------------------------------------

def _real_tokenizer():
    data = GPT2_VOCABULARY  # OpenAI's files, shipped in the package
    return (data / "encoder.json").read_bytes(), (data / "vocab.bpe").read_bytes()


def test_the_pins_are_the_shipped_files_digests_and_tiktokens():
    import inspect

    encoder, bpe = _real_tokenizer()
    assert hashlib.sha256(encoder).hexdigest() == sources.PINNED["encoder.json"]
    assert sources.PINNED["vocab.json"] == sources.PINNED["encoder.json"]
    assert (hashlib.sha256(bpe).hexdigest() == sources.PINNED["vocab.bpe"]
            == sources.PINNED["merges.txt"])
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    source = inspect.getsource(openai_public.gpt2)
    assert f'encoder_json_hash="{sources.PINNED["encoder.json"]}"' in source
    assert f'vocab_bpe_hash="{sources.PINNED["vocab.bpe"]}"' in source


@pytest.fixture
def gpt2_vocab_server(server):
    """The mirror serving a model with GPT-2's vocabulary: n_vocab 50257, OpenAI's tokenizer."""
    encoder, bpe = _real_tokenizer()
    hparams = json.loads(served(server, "hparams.json"))
    server.files["/124M/hparams.json"] = json.dumps(dict(hparams, n_vocab=50257)).encode()
    server.files["/124M/encoder.json"] = encoder
    server.files["/124M/vocab.bpe"] = bpe
    return server


def test_gpt2s_tokenizer_is_verified_after_download(gpt2_vocab_server, tmp_path):
    folder = dl.download("124M", tmp_path, gpt2_vocab_server.url, **FAST)
    assert dl.verified_source(folder) == "openai"


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_a_damaged_tokenizer_is_refused_and_removed(gpt2_vocab_server, tmp_path, damage):
    bpe = gpt2_vocab_server.files["/124M/vocab.bpe"]
    if damage == "truncate":
        gpt2_vocab_server.files["/124M/vocab.bpe"] = bpe[: len(bpe) // 2]
    else:
        gpt2_vocab_server.add_fault("vocab.bpe", ("corrupt", 1000))
    with pytest.raises(dl.DownloadError, match="is not GPT-2's vocab.bpe"):
        dl.download("124M", tmp_path, gpt2_vocab_server.url, **FAST)
    assert not (tmp_path / "124M" / "vocab.bpe").exists()
    assert not dl.verified_source(tmp_path / "124M")


def placed_by_hand(tmp_path, encoder):
    """The fixture placed in the weights folder as 124M with GPT-2's vocabulary: n_vocab 50257,
    OpenAI's vocab.bpe and `encoder` as encoder.json."""
    folder = tmp_path / "124M"
    shutil.copytree(FIXTURE, folder)
    hparams = json.loads((folder / "hparams.json").read_text())
    (folder / "hparams.json").write_text(json.dumps(dict(hparams, n_vocab=50257)))
    (folder / "vocab.bpe").write_bytes(_real_tokenizer()[1])
    (folder / "encoder.json").write_bytes(encoder)
    return folder


def test_a_damaged_tokenizer_placed_by_hand_is_refused_but_kept(tmp_path):
    encoder, _ = _real_tokenizer()
    folder = placed_by_hand(tmp_path, encoder.replace(b'"hello"', b'"hellO"'))
    with pytest.raises(dl.DownloadError, match="is not GPT-2's encoder.json"):
        dl.ensure_model("124M", tmp_path, closed_port_url())
    assert (folder / "encoder.json").exists()
    assert not dl.verified_source(folder)


def test_gpt2s_tokenizer_in_other_bytes_is_gpt2s_by_its_tables(tmp_path):
    encoder, _ = _real_tokenizer()
    anew = json.dumps(json.loads(encoder), indent=1).encode()  # the same table, other bytes
    assert hashlib.sha256(anew).hexdigest() != sources.PINNED["encoder.json"]
    folder = placed_by_hand(tmp_path, anew)
    assert dl.ensure_model("124M", tmp_path, closed_port_url()) == folder
    assert dl.verified_source(folder) == "openai"


# --- the HuggingFace hub as a source --------------------------------------------------------------

REPO = "openai-community/gpt2"


@pytest.fixture(scope="module")
def hub_files():
    """The fixture model in the hub's layout: HF's names and shapes, written by safetensors."""
    import numpy as np
    from _reference import hf_names

    from picogpt.formats import tf_checkpoint as checkpoint

    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    hparams = json.loads((FIXTURE / "hparams.json").read_text())
    params = checkpoint.read(FIXTURE)
    tensors = {hf: np.ascontiguousarray(params[tf][0] if params[tf].ndim == 3 else params[tf])
               for tf, hf in hf_names(hparams["n_layer"]).items()}
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "vocab_size": hparams["n_vocab"], "n_positions": hparams["n_ctx"],
              "n_embd": hparams["n_embd"], "n_layer": hparams["n_layer"],
              "n_head": hparams["n_head"], "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-05, "bos_token_id": hparams["n_vocab"] - 1,
              "eos_token_id": hparams["n_vocab"] - 1}
    return {"config.json": json.dumps(config, indent=2).encode(),
            "model.safetensors": safetensors_numpy.save(tensors, metadata={"format": "pt"}),
            "vocab.json": (FIXTURE / "encoder.json").read_bytes(),
            "merges.txt": (FIXTURE / "vocab.bpe").read_bytes()}


@pytest.fixture
def hub(hub_files):
    with HubServer({REPO: dict(hub_files)}) as s:
        yield s


def hub_get(hub, name):
    return hub.files[f"/{REPO}/resolve/main/{name}"]


def assert_hub_complete(hub, folder):
    for name in sources.HF_FILES:
        assert (folder / name).read_bytes() == hub_get(hub, name), name
    assert not list(folder.glob("*.part"))
    assert dl.verified_source(folder) == "huggingface"


def test_the_hub_is_a_source(hub, tmp_path):
    folder = dl.download("gpt2", tmp_path, hub.url, source="huggingface", **FAST)
    assert folder == tmp_path / "124M"
    assert_hub_complete(hub, folder)
    paths = [p for p, _ in hub.requests]
    for name in sources.HF_FILES:
        assert f"/{REPO}/resolve/main/{name}" in paths
    blob = f"/blobs/{hashlib.sha256(hub_get(hub, 'model.safetensors')).hexdigest()}"
    assert blob in paths  # the large file came from the CDN the hub redirected to
    n = len(hub.requests)
    assert dl.ensure_model("124M", tmp_path, hub.url, "huggingface") == folder
    assert dl.ensure_model("124M", tmp_path, closed_port_url()) == folder  # any source's model
    assert len(hub.requests) == n


def test_the_source_comes_from_the_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("PICOGPT_SOURCE", "huggingface")
    monkeypatch.setenv("PICOGPT_BASE_URL", hub.url)
    assert_hub_complete(hub, dl.ensure_model("124M", tmp_path))
    monkeypatch.setenv("PICOGPT_SOURCE", "somewhere")
    with pytest.raises(dl.DownloadError, match="unknown download source 'somewhere'"):
        dl.ensure_model("355M", tmp_path)


def test_a_dropped_transfer_from_the_cdn_resumes_with_range(hub, tmp_path):
    weights = hub_get(hub, "model.safetensors")
    hub.add_fault("model.safetensors", ("drop", len(weights) // 2))
    folder = dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert_hub_complete(hub, folder)
    ranges = [r for p, r in hub.requests if p.startswith("/blobs/")]
    assert ranges[0] is None and 0 < int(ranges[1][6:-1]) <= len(weights) // 2
    # Each attempt asked the hub first, which redirected it again.
    assert len(hub.requests_for("model.safetensors")) == 4


def test_weights_that_do_not_match_the_announced_sha256_are_never_kept(hub, tmp_path):
    hub.redirect_faults["model.safetensors"] = ("digest", "ab" * 32)
    with pytest.raises(dl.DownloadError, match="sha256 is [0-9a-f]{64}, expected abab"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    folder = tmp_path / "124M"
    assert not (folder / "model.safetensors").exists()
    assert not (folder / "model.safetensors.part").exists()
    assert not dl.verified_source(folder)
    del hub.redirect_faults["model.safetensors"]
    assert_hub_complete(hub, dl.ensure_model("124M", tmp_path, hub.url, "huggingface"))


def test_corrupted_weights_from_the_cdn_are_refused(hub, tmp_path):
    hub.add_fault("model.safetensors", ("corrupt", 100))
    with pytest.raises(dl.DownloadError, match="not the file the server announced"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert not (tmp_path / "124M" / "model.safetensors").exists()


def test_a_small_file_is_checked_against_its_git_blob_id(hub, tmp_path):
    hub.add_fault("vocab.json", ("corrupt", 10))
    with pytest.raises(dl.DownloadError, match="vocab.json .* git-sha1"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert not (tmp_path / "124M" / "vocab.json").exists()


def test_no_announced_digest_is_said(hub, tmp_path, capsys):
    hub.redirect_faults["model.safetensors"] = ("no-digest",)
    folder = dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert_hub_complete(hub, folder)
    assert "announced no sha256" in capsys.readouterr().err


def test_a_renamed_repository_is_followed_and_still_verified(hub_files, tmp_path):
    with HubServer({"new-owner/gpt2": dict(hub_files)}, renamed={REPO: "new-owner/gpt2"}) as s:
        s.add_fault("vocab.json", ("corrupt", 10))
        with pytest.raises(dl.DownloadError, match="vocab.json .* git-sha1"):  # its id was found
            dl.download("124M", tmp_path, s.url, source="huggingface", **FAST)
        s.redirect_faults["model.safetensors"] = ("digest", "cd" * 32)
        with pytest.raises(dl.DownloadError, match="expected cdcd"):  # the sha256 was found
            dl.download("124M", tmp_path, s.url, source="huggingface", **FAST)
        del s.redirect_faults["model.safetensors"]
        folder = dl.download("124M", tmp_path, s.url, source="huggingface", **FAST)
        assert dl.verified_source(folder) == "huggingface"
        assert (folder / "model.safetensors").read_bytes() == hub_files["model.safetensors"]


def test_hub_files_placed_by_hand_are_used_whatever_the_source(hub_files, tmp_path):
    folder = tmp_path / "124M"
    folder.mkdir()
    for name, data in hub_files.items():
        (folder / name).write_bytes(data)
    assert dl.ensure_model("124M", tmp_path, closed_port_url()) == folder  # default: openai
    assert dl.verified_source(folder) == "huggingface"


def test_weights_of_another_size_than_announced_are_refused(hub, tmp_path):
    weights = hub_get(hub, "model.safetensors")
    hub.cdn.files[f"/blobs/{hashlib.sha256(weights).hexdigest()}"] = weights[:-100]
    with pytest.raises(dl.DownloadError, match=f"announced {len(weights)} bytes .X-Linked-Size"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert not (tmp_path / "124M" / "model.safetensors").exists()


def test_weights_cut_short_without_a_digest_fail_verification(hub, tmp_path):
    hub.redirect_faults["model.safetensors"] = ("no-digest",)
    weights = hub_get(hub, "model.safetensors")
    hub.cdn.files[f"/blobs/{hashlib.sha256(weights).hexdigest()}"] = weights[:-100]
    with pytest.raises(dl.DownloadError, match="failed verification: .*model.safetensors"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert not (tmp_path / "124M" / "model.safetensors").exists()
    assert not dl.verified_source(tmp_path / "124M")


@pytest.mark.slow
def test_weights_of_gpt2s_real_size_come_through_a_drop(hub_files, tmp_path):
    import numpy as np
    from safetensors.numpy import load, save

    n = 548_105_171  # the hub's model.safetensors for gpt2, in bytes
    tensors = load(hub_files["model.safetensors"])
    tensors["padding"] = np.zeros((n - len(hub_files["model.safetensors"])) // 4, np.float32)
    weights = save(tensors)
    assert abs(len(weights) - n) < 1000
    with HubServer({REPO: dict(hub_files, **{"model.safetensors": weights})}) as s:
        s.add_fault("model.safetensors", ("drop", n // 3))
        folder = dl.download("124M", tmp_path, s.url, source="huggingface", **FAST)
        ranges = [r for p, r in s.requests if p.startswith("/blobs/")]
    assert ranges[0] is None and ranges[1].startswith("bytes=")
    assert (folder / "model.safetensors").stat().st_size == len(weights)
    assert dl.verified_source(folder) == "huggingface"


def test_a_redirect_loop_at_the_hub_is_one_error(hub, tmp_path):
    hub.redirect_faults["model.safetensors"] = ("loop",)
    with pytest.raises(dl.DownloadError, match="more than 10 redirects"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)


def test_the_hubs_copy_of_gpt2s_tokenizer_is_pinned(hub, tmp_path):
    encoder, bpe = _real_tokenizer()
    config = json.loads(hub_get(hub, "config.json"))
    hub.files[f"/{REPO}/resolve/main/config.json"] = json.dumps(
        dict(config, vocab_size=50257)).encode()
    hub.files[f"/{REPO}/resolve/main/vocab.json"] = encoder
    hub.files[f"/{REPO}/resolve/main/merges.txt"] = bpe[:-100]  # its git id matches: not enough
    with pytest.raises(dl.DownloadError, match="is not GPT-2's merges.txt"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert not (tmp_path / "124M" / "merges.txt").exists()
    hub.files[f"/{REPO}/resolve/main/merges.txt"] = bpe
    assert dl.verified_source(dl.download("124M", tmp_path, hub.url, source="huggingface",
                                          **FAST)) == "huggingface"


def test_offline_openai_suggests_the_hub_unless_a_source_was_chosen(tmp_path, monkeypatch):
    monkeypatch.delenv("PICOGPT_SOURCE", raising=False)
    with pytest.raises(dl.ModelNotFoundError, match="--source huggingface"):
        dl.ensure_model("124M", tmp_path, closed_port_url())
    with pytest.raises(dl.ModelNotFoundError) as e:
        dl.ensure_model("124M", tmp_path, closed_port_url(), source="openai")
    assert "huggingface" not in str(e.value)
    url = closed_port_url()
    with pytest.raises(dl.ModelNotFoundError) as e:
        dl.ensure_model("124M", tmp_path, url, source="huggingface")
    assert ("place the hub's files (config.json, vocab.json, merges.txt, model.safetensors) "
            f"from {url}/{REPO}/ in {tmp_path / '124M'} by hand") in str(e.value)


def test_a_folder_holds_one_model(server, hub, tmp_path):
    openai = dl.download("124M", tmp_path, server.url, **FAST)
    n = len(hub.requests)
    assert dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST) == openai
    assert len(hub.requests) == n  # OpenAI's verified copy is the model; nothing fetched
    (openai / dl.VERIFIED).unlink()
    (openai / DATA).unlink()  # an unfinished OpenAI download: its hparams and index remain
    with pytest.raises(dl.DownloadError, match="holds one model"):
        dl.download("124M", tmp_path, hub.url, source="huggingface", **FAST)
    assert len(hub.requests) == n


# --- through the command line: one line, exit 2 for bad arguments, 1 for failures -----------------

ROOT = Path(__file__).resolve().parents[1]


def picogpt_cmd(*args, tmp_path, timeout=60, **env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PICOGPT_WEIGHTS=str(tmp_path / "weights"),
               NO_PROXY="127.0.0.1", **env)
    for key in ("PICOGPT_SOURCE", "PICOGPT_BASE_URL"):
        if key not in env or env[key] is None:
            env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "picogpt", *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line(out, status, prefix="picogpt: "):
    assert out.returncode == status, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().split("\n")[-1]
    assert last.startswith(prefix), out.stderr
    return last


@pytest.mark.parametrize("url", ["ftp://example.com/x", "127.0.0.1:1/x", "http://[::1/x",
                                 "http://127.0.0.1:99999"])
@pytest.mark.parametrize("command", [["download", "124M"], ["Hello"], ["chat"],
                                     ["eval", "text.txt"], ["export", "124M", "out"], ["serve"],
                                     ["train", "text.txt", "--out", "out", "--init", "124M"]])
def test_cli_a_bad_base_url_is_exit_2(command, url, tmp_path, capsys, monkeypatch):
    from picogpt import cli

    monkeypatch.setenv("PICOGPT_WEIGHTS", str(tmp_path / "weights"))
    (tmp_path / "text.txt").write_text("Hello there")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--base-url", url])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("picogpt: error: argument --base-url: not an http(s) URL")
    assert err.count("\n") == 1 and url in err
    assert not (tmp_path / "weights").exists()


def test_cli_a_bad_base_url_is_exit_2_from_the_installed_command(tmp_path):
    out = picogpt_cmd("download", "124M", "--base-url", "http://[::1/x", tmp_path=tmp_path)
    assert_one_line(out, 2, "picogpt: error: argument --base-url: not an http(s) URL")


def test_cli_a_bad_base_url_or_source_in_the_environment_is_exit_2(tmp_path):
    out = picogpt_cmd("download", "124M", tmp_path=tmp_path, PICOGPT_BASE_URL="ftp://x/y")
    assert "$PICOGPT_BASE_URL" in assert_one_line(out, 2, "picogpt: error: ")
    out = picogpt_cmd("Hello", tmp_path=tmp_path, PICOGPT_SOURCE="s3")
    assert "$PICOGPT_SOURCE" in assert_one_line(out, 2, "picogpt: error: ")
    out = picogpt_cmd("download", "124M", "--source", "github", tmp_path=tmp_path)
    assert "expected one of openai, huggingface" in assert_one_line(out, 2, "picogpt: error: ")


@pytest.mark.parametrize("fault", [("length", 10**15), ("loop",), ("dup-length",)])
def test_cli_a_misbehaving_mirror_is_exit_1(server, tmp_path, fault):
    server.always[DATA] = fault
    out = picogpt_cmd("download", "124M", "--base-url", server.url, tmp_path=tmp_path)
    assert DATA in assert_one_line(out, 1)


def test_cli_a_folder_that_cannot_be_written_is_exit_1(server, immutable):
    out = picogpt_cmd("Hello", "--base-url", server.url, tmp_path=immutable.parents[1])
    assert "cannot write in" in assert_one_line(out, 1)


def test_cli_downloads_from_the_hub(hub, tmp_path):
    out = picogpt_cmd("download", "gpt2", "--source", "huggingface", "--base-url", hub.url,
                      tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"from {hub.url}/{REPO}/" in out.stderr
    assert_hub_complete(hub, tmp_path / "weights" / "124M")


def test_cli_offline_suggests_the_hub(tmp_path):
    out = picogpt_cmd("Hello", "--base-url", closed_port_url(), tmp_path=tmp_path)
    assert "--source huggingface" in assert_one_line(out, 1, "Or fetch it from the HuggingFace")


def test_resolve_passes_the_source_through(hub, tmp_path):
    import picogpt

    # The hub here serves only gpt2: gpt2-medium is asked for where the hub keeps it, and is a 404.
    with pytest.raises(dl.DownloadError, match=f"{REPO}-medium/resolve/main/config.json does not"):
        picogpt.resolve("gpt2-medium", tmp_path, hub.url, source="huggingface")
    assert picogpt.resolve("gpt2", tmp_path, hub.url, source="huggingface") == tmp_path / "124M"
    assert_hub_complete(hub, tmp_path / "124M")


def test_a_model_from_the_hub_loads_and_predicts_as_openais(server, hub, tmp_path):
    import numpy as np

    import picogpt

    from_hub = picogpt.load("gpt2", tmp_path / "hub", hub.url, source="huggingface")
    from_openai = picogpt.load("gpt2", tmp_path / "openai", server.url, source="openai")
    assert from_hub.folder == tmp_path / "hub" / "124M"
    ids = from_openai.encode("Hello world, hello")
    assert from_hub.encode("Hello world, hello") == ids
    logits_hub, logits_openai = from_hub.logits(ids), from_openai.logits(ids)
    np.testing.assert_allclose(logits_hub, logits_openai, rtol=1e-6, atol=1e-6)


def test_cli_generates_with_a_model_from_the_hub(server, hub, tmp_path):
    args = ["Hello world", "--n", "8", "--seed", "3"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    hub_out = picogpt_cmd(*args, "--source", "huggingface", "--base-url", hub.url,
                          tmp_path=tmp_path / "a")
    openai_out = picogpt_cmd(*args, "--base-url", server.url, tmp_path=tmp_path / "b")
    assert hub_out.returncode == 0 and openai_out.returncode == 0, (hub_out.stderr,
                                                                     openai_out.stderr)
    assert hub_out.stdout == openai_out.stdout and len(hub_out.stdout) > len("Hello world")
    assert f"from {hub.url}/{REPO}/" in hub_out.stderr


def test_cli_fine_tunes_a_model_from_the_hub(hub, tmp_path):
    (tmp_path / "text.txt").write_text("Hello world, hello there. " * 40)
    out = picogpt_cmd("train", "text.txt", "--out", "tuned", "--init", "gpt2", "--source",
                      "huggingface", "--base-url", hub.url, "--max-iters", "1",
                      "--block-size", "16", tmp_path=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert_hub_complete(hub, tmp_path / "weights" / "124M")
    assert (tmp_path / "tuned" / "hparams.json").is_file()
