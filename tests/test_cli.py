"""The `picogpt` command end to end: a subprocess against a real HTTP server on 127.0.0.1 that
serves the TF-written fixture model as GPT-2 "124M"."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _cli_server import ModelServer, closed_port_url
from _damaged import big_endian_over_little, with_a_nan

import picogpt
from picogpt.cli.chat import _reply
from picogpt.generation.chat import Conversation
from picogpt.hub import download as dl
from picogpt.hub import sources

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "gpt2-tiny"
DATA = "model.ckpt.data-00000-of-00001"
EOT = 512  # <|endoftext|> in the fixture's encoder.json
needs_fixture = pytest.mark.skipif(not (FIXTURE / DATA).is_file(),
                                   reason="the fixture model tests/fixtures/gpt2-tiny is missing")
needs_engine = pytest.mark.skipif(not hasattr(picogpt, "load"), reason="the engine is missing")


@pytest.fixture
def server():
    extra = {} if (FIXTURE / "model.ckpt.meta").is_file() else {"model.ckpt.meta": b"meta" * 100}
    with ModelServer(FIXTURE, extra_files=extra) as s:
        yield s


@pytest.fixture
def env(tmp_path, server):
    """The environment of a user whose weights folder is empty and whose 'OpenAI' is `server`."""
    return dict(os.environ, PYTHONPATH=str(ROOT), PICOGPT_WEIGHTS=str(tmp_path / "weights"),
                PICOGPT_BASE_URL=server.url, NO_PROXY="127.0.0.1", PYTHONIOENCODING="utf-8")


def picogpt_cmd(*args, env, input=None, timeout=60, cwd=None):
    return subprocess.run([sys.executable, "-m", "picogpt", *args], env=env, input=input,
                          capture_output=True, text=True, timeout=timeout, encoding="utf-8",
                          cwd=cwd or env["PICOGPT_WEIGHTS"].rsplit("/", 1)[0])


def assert_clean_failure(out, status):
    assert out.returncode == status, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr


# --- arguments ------------------------------------------------------------------------------------

def test_help_explains_with_examples(env):
    out = picogpt_cmd("--help", env=env)
    assert out.returncode == 0
    for needle in ("usage: picogpt", "examples:", "picogpt chat", "--top-p", "--samples",
                   "weights folder", "PICOGPT_WEIGHTS"):
        assert needle in out.stdout, needle
    for command in ("chat", "download", "eval"):
        sub = picogpt_cmd(command, "--help", env=env)
        assert sub.returncode == 0 and f"usage: picogpt {command}" in sub.stdout


@pytest.mark.parametrize("args", [
    ["Hello", "--n", "-1"],
    ["Hello", "--temperature", "-0.5"],
    ["Hello", "--top-p", "0"],
    ["Hello", "--top-p", "1.01"],
    ["Hello", "--top-k", "-1"],
    ["Hello", "--n", "ten"],
    ["Hello", "--samples", "0"],
    ["--prompt-file", "no-such-prompt.txt"],
    ["Hello", "--model", "no-such-model"],
    ["generate"],
    ["chat", "--temperature", "-1"],
    ["Hello", "--frequency-penalty", "nan"],
    ["Hello", "--frequency-penalty", "2.5"],
    ["Hello", "--presence-penalty", "-2.01"],
    ["Hello", "--presence-penalty", "inf"],
    ["Hello", "--logprobs", "21"],
    ["Hello", "--logprobs", "-1"],
    ["Hello", "--logprobs", "two"],
    ["Hello", "--stop", ""],
    ["Hello", *[a for i in range(17) for a in ("--stop", f"s{i}")]],
    ["chat", *[a for i in range(16) for a in ("--stop", f"s{i}")]],
    ["chat", "--presence-penalty", "3"],
    ["download", "125M"],
    ["eval", "no-such-file.txt"],
    ["Hello", "--threads", "0"],
    ["Hello", "--dtype", "float8"],
    ["chat", "--threads", "many"],
    ["train", "no-such-file.txt", "--out", "x", "--threads", "-2"],
])
def test_bad_input_is_one_line_and_exit_2(args, env, server):
    out = picogpt_cmd(*args, env=env)
    assert_clean_failure(out, 2)
    assert out.stderr.startswith("picogpt: error: ") and out.stderr.count("\n") == 1, out.stderr
    assert server.requests == []  # nothing fetched for a command that cannot run


@pytest.mark.parametrize("command", [["Hello"], ["eval", "no-such-file.txt"],
                                     ["train", "no-such-file.txt", "--out", "x"]])
def test_a_bad_picogpt_threads_is_one_line_and_exit_2(command, env, server):
    out = picogpt_cmd(*command, env=dict(env, PICOGPT_THREADS="1.5"))
    assert_clean_failure(out, 2)
    assert "PICOGPT_THREADS='1.5'" in out.stderr and out.stderr.count("\n") == 1, out.stderr
    assert server.requests == []


def test_any_thread_count_generates_the_same_text(env):
    """Greedy decoding of the bundled model after a prompt long enough to be split: the same
    text at 1 thread and at 3 (--threads, and PICOGPT_THREADS)."""
    prompt = "ROMEO:\nWhat light through yonder window breaks? " * 2
    args = ["--model", "shakespeare-char", "--n", "40", "--temperature", "0"]
    one = picogpt_cmd(prompt, *args, "--threads", "1", env=env)
    three = picogpt_cmd(prompt, *args, "--threads", "3", env=env)
    from_env = picogpt_cmd(prompt, *args, env=dict(env, PICOGPT_THREADS="3"))
    assert one.returncode == three.returncode == from_env.returncode == 0, three.stderr
    assert one.stdout == three.stdout == from_env.stdout and len(one.stdout) > len(prompt)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_every_dtype_generates_and_evaluates(dtype, env, tmp_path):
    """The bundled model's greedy text in each dtype starts as float32's does, and eval runs."""
    args = ["--model", "shakespeare-char", "--n", "12", "--temperature", "0"]
    ours = picogpt_cmd("ROMEO:", *args, "--dtype", dtype, env=env)
    reference = picogpt_cmd("ROMEO:", *args, "--dtype", "float32", env=env)
    assert ours.returncode == reference.returncode == 0, ours.stderr
    assert ours.stdout[:12] == reference.stdout[:12]
    text = tmp_path / "text.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 4)
    out = picogpt_cmd("eval", text, "-m", "shakespeare-char", "--dtype", dtype, env=env)
    assert out.returncode == 0 and "perplexity" in out.stdout, out.stderr
    assert f"model:         shakespeare-char ({dtype})\n" in out.stdout  # which one was scored


def test_train_is_imported_only_when_asked_for():
    code = ("import sys, contextlib, io; from picogpt import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['--help'])\n"
            "    except SystemExit: pass\n"
            "print('picogpt.training' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# --- downloads through the command ----------------------------------------------------------------

@needs_fixture
@needs_engine
def test_first_run_downloads_and_generates_then_uses_the_cache(env, server, tmp_path):
    first = picogpt_cmd("Hello world", "--n", "12", "--seed", "7", env=env)
    assert first.returncode == 0, first.stderr
    assert "Downloading GPT-2 124M" in first.stderr
    assert sorted(p for p, _ in server.requests) == sorted(f"/124M/{f}" for f in sources.FILES)
    assert first.stdout.startswith("Hello world") and len(first.stdout) > len("Hello world")

    # The same continuation the Python API gives (seeded sampling is deterministic).
    model = picogpt.load(str(tmp_path / "weights" / "124M"))
    expected = "".join(model.stream("Hello world", n=12, seed=7))
    assert first.stdout == "Hello world" + expected + ("" if expected.endswith("\n") else "\n")

    n = len(server.requests)
    second = picogpt_cmd("Hello world", "--n", "12", "--seed", "7", env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert len(server.requests) == n and "Downloading" not in second.stderr


@needs_fixture
def test_download_command_then_offline_use(env, server, tmp_path):
    out = picogpt_cmd("download", "gpt2", env=env)
    assert out.returncode == 0, out.stderr
    assert f"ready in {tmp_path / 'weights' / '124M'}" in out.stderr
    for name in sources.FILES:
        assert (tmp_path / "weights" / "124M" / name).read_bytes() == server.files[f"/124M/{name}"]


@needs_fixture
def test_ctrl_c_mid_download_then_the_next_run_resumes(env, server, tmp_path):
    server.bytes_per_second = 50_000  # slow enough to interrupt in the middle
    part = tmp_path / "weights" / "124M" / (DATA + ".part")
    proc = subprocess.Popen([sys.executable, "-m", "picogpt", "download", "124M"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    kept = part.stat().st_size
    assert 0 < kept < len(server.files[f"/124M/{DATA}"])

    server.bytes_per_second = None
    out = picogpt_cmd("download", "124M", env=env)
    assert out.returncode == 0, out.stderr
    assert server.requests_for(DATA)[-1] == (f"/124M/{DATA}", f"bytes={kept}-")
    data = (tmp_path / "weights" / "124M" / DATA).read_bytes()
    assert data == server.files[f"/124M/{DATA}"]


@needs_fixture
def test_corrupted_download_is_caught_and_never_loaded(env, server, tmp_path):
    server.add_fault(DATA, ("corrupt", len(server.files[f"/124M/{DATA}"]) // 2))
    out = picogpt_cmd("Hello", "--n", "3", env=env)
    assert_clean_failure(out, 1)
    assert "failed verification" in out.stderr and out.stdout == ""
    assert not (tmp_path / "weights" / "124M" / DATA).exists()


def test_offline_names_the_url_and_the_folder(env, tmp_path):
    env = dict(env, PICOGPT_BASE_URL=closed_port_url())
    out = picogpt_cmd("Hello", env=env, timeout=30)
    assert_clean_failure(out, 1)
    assert f"{env['PICOGPT_BASE_URL']}/124M/" in out.stderr
    assert str(tmp_path / "weights" / "124M") in out.stderr and "by hand" in out.stderr


def test_base_url_and_weights_dir_flags_beat_the_environment(env, server, tmp_path):
    if not (FIXTURE / DATA).is_file():
        pytest.skip("the fixture model is missing")
    env = dict(env, PICOGPT_BASE_URL=closed_port_url())
    out = picogpt_cmd("download", "124M", "--base-url", server.url,
                      "--weights-dir", str(tmp_path / "elsewhere"), env=env)
    assert out.returncode == 0, out.stderr
    assert dl._is_verified(tmp_path / "elsewhere" / "124M")


# --- generate, chat, eval with the fixture model --------------------------------------------------

@pytest.fixture
def ready_env(env, tmp_path):
    """A weights folder that already holds the fixture as 124M (placed by hand)."""
    if not (FIXTURE / DATA).is_file():
        pytest.skip("the fixture model is missing")
    if not hasattr(picogpt, "load"):
        pytest.skip("the engine is missing")
    import shutil

    shutil.copytree(FIXTURE, tmp_path / "weights" / "124M")
    return env


def test_prompt_from_stdin_and_a_prompt_named_like_a_command(ready_env):
    out = picogpt_cmd("-", "--n", "5", "--seed", "1", env=ready_env, input="From stdin")
    assert out.returncode == 0 and out.stdout.startswith("From stdin"), out.stderr
    out = picogpt_cmd("generate", "chat", "--n", "5", "--seed", "1", env=ready_env)
    assert out.returncode == 0 and out.stdout.startswith("chat"), out.stderr


def test_samples_and_no_echo(ready_env, tmp_path):
    out = picogpt_cmd("Hi", "--n", "6", "--samples", "2", "--seed", "3", "--no-echo",
                      env=ready_env)
    assert out.returncode == 0, out.stderr
    parts = re.split(r"--- sample \d of 2 ---\n", out.stdout)
    assert parts[0] == "" and len(parts) == 3
    model = picogpt.load(str(tmp_path / "weights" / "124M"))
    for k, part in enumerate(parts[1:]):
        assert part.rstrip("\n") == "".join(model.stream("Hi", n=6, seed=3 + k)).rstrip("\n")


def test_piped_chat_streams_one_reply_per_line_and_exits_at_eof(ready_env):
    lines = [f"message number {i}, tell me more" for i in range(12)]  # overflows the 64 context
    out = picogpt_cmd("chat", "--n", "8", "--seed", "1", env=ready_env,
                      input="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    turns = out.stdout.splitlines()
    assert turns[0::2] == [f"you> {m}" for m in lines]
    assert all(t.startswith("gpt2> ") for t in turns[1::2]) and len(turns) == 2 * len(lines)


def test_piped_chat_says_which_message_is_not_utf8_and_goes_on(ready_env):
    out = subprocess.run([sys.executable, "-m", "picogpt", "chat", "--n", "4", "--seed", "1"],
                         env=ready_env, input=b"Hello \xff there\nHi\n", capture_output=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    turns = out.stdout.decode("utf-8", "replace").splitlines()
    assert turns[1] == "(cannot read that message: it is not UTF-8 text)"
    assert turns[2] == "you> Hi" and turns[3].startswith("gpt2> ") and len(turns) == 4


@pytest.mark.parametrize("logprobs", [[], ["--logprobs", "2"]])
def test_a_prompt_the_model_cannot_read_writes_nothing_to_stdout(env, logprobs):
    out = picogpt_cmd("Café", "-m", "shakespeare-char", "--n", "5", *logprobs, env=env)
    assert_clean_failure(out, 2)
    assert out.stdout == "" and "outside this model's vocabulary" in out.stderr


def test_chat_prompt_keeps_a_stable_prefix_and_fits_the_context(tmp_path):
    if not (FIXTURE / DATA).is_file() or not hasattr(picogpt, "load"):
        pytest.skip("needs the fixture model and the engine")
    model = picogpt.load(str(FIXTURE))
    chat = Conversation(model, reply_tokens=8, preamble="Chat.\n")
    first = chat.prompt("hi")
    chat.add("hi", " hello")
    second = chat.prompt("ok")
    # Turn 2 extends turn 1's prompt (and reply) text: the cached prefix stays valid.
    assert second.startswith(first + " hello\n")
    budget = model.hparams["n_ctx"] - 8
    for i in range(30):
        text = chat.prompt(f"message {i} " * 3)
        assert len(model.encode(text)) <= budget
        chat.add(f"message {i} " * 3, " sure")
    assert text.endswith(f"User: {'message 29 ' * 3}\nAssistant:")
    assert len(chat.turns) < 30  # the oldest were dropped
    long = chat.prompt("word " * 200)  # longer than the whole context: its end is kept
    assert len(model.encode(long)) <= budget and long.endswith("Assistant:")


def _log_softmax(logits):
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    peak = logits.max(axis=-1, keepdims=True)
    return logits - peak - np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True))


def _eval(path, env, *flags):
    out = picogpt_cmd("eval", str(path), *flags, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout, {k: float(v) for k, v in
                        re.findall(r"^([a-z -]+):\s+([0-9.]+)", out.stdout, re.M)}


def test_eval_of_a_short_file_is_the_plain_cross_entropy(ready_env, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("The cat sat on the mat. Caf\u00e9!", encoding="utf-8")
    stdout, got = _eval(path, ready_env)
    model = picogpt.load(str(FIXTURE))
    text = path.read_text(encoding="utf-8")
    ids = [EOT, *model.encode(text)]  # every token scored, after <|endoftext|>
    n_bytes = len(text.encode("utf-8"))
    assert len(ids) <= model.hparams["n_ctx"]
    assert f"{len(ids) - 1} tokens scored, {n_bytes} bytes;" in stdout
    ce = -_log_softmax(model.logits(ids))[range(len(ids) - 1), ids[1:]].mean()
    assert math.isclose(got["cross-entropy"], ce, rel_tol=1e-4)
    assert math.isclose(got["perplexity"], math.exp(ce), rel_tol=1e-3)
    bpb = ce * (len(ids) - 1) / math.log(2) / len(text.encode("utf-8"))
    assert math.isclose(got["bits per byte"], bpb, rel_tol=1e-3)


def test_eval_of_a_long_file_slides_the_window(ready_env, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("All work and no play makes Jack a dull boy.\n" * 6, encoding="utf-8")
    model = picogpt.load(str(FIXTURE))
    n_ctx = model.hparams["n_ctx"]
    ids = [EOT, *model.encode(path.read_text(encoding="utf-8"))]
    assert len(ids) > 2 * n_ctx
    # With stride 1 every token is predicted from the n_ctx tokens before it (a full context).
    nll = [-_log_softmax(model.logits(ids[max(0, t - n_ctx):t]))[-1, ids[t]]
           for t in range(1, len(ids))]
    _, got = _eval(path, ready_env, "--stride", "1")
    assert math.isclose(got["cross-entropy"], sum(nll) / len(nll), rel_tol=1e-4)
    # The default stride (half the window) gives less context to some tokens, never none.
    _, half = _eval(path, ready_env)
    assert math.isfinite(half["cross-entropy"]) and half["cross-entropy"] > 0


def test_chat_turns_reuse_the_kv_cache():
    if not (FIXTURE / DATA).is_file() or not hasattr(picogpt, "load"):
        pytest.skip("needs the fixture model and the engine")
    import io

    import numpy as np

    model = picogpt.load(str(FIXTURE))
    positions = []  # how many positions each forward pass of the engine runs
    forward = model.gpt.forward

    def counting_forward(ids, *args, **kwargs):
        positions.append(np.asarray(ids).shape[1])
        return forward(ids, *args, **kwargs)

    model.gpt.forward = counting_forward
    chat = Conversation(model, reply_tokens=8, preamble="A chat.\n")
    options = dict(n=8, temperature=1.0, top_k=40, top_p=None)
    first = chat.prompt("hi there")
    reply = _reply(model, first, io.StringIO(), seed=1, **options)
    assert positions[0] == len(model.encode(first))  # a fresh model computes the whole prompt
    chat.add("hi there", reply)

    positions.clear()
    second = chat.prompt("and then?")
    assert second.startswith(first + reply + "\n")
    _reply(model, second, io.StringIO(), seed=2, **options)
    # Turn 1's prompt is still in the cache: at most the reply's line and the new message run
    # (all of the reply when its text re-encodes differently, as random weights' bytes may).
    assert positions[0] <= len(model.encode(second)) - len(model.encode(first)) + 1


def test_output_streams_and_ctrl_c_stops_cleanly(ready_env):
    # 100,000 tokens would take minutes: text arriving early proves it streams as generated.
    proc = subprocess.Popen([sys.executable, "-m", "picogpt", "Stream", "--n", "100000"],
                            env=ready_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace")
    try:
        head = proc.stdout.read(len("Stream") + 20)
        assert head.startswith("Stream") and len(head) == len("Stream") + 20
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err


def test_train_command_delegates_to_picogpt_train(env):
    pytest.importorskip("picogpt.training.loop")
    out = picogpt_cmd("train", "--help", env=env)
    assert out.returncode == 0 and "usage: picogpt train" in out.stdout, out.stderr


# --- stop strings, penalties, logprobs ------------------------------------------------------------

def test_stop_and_penalties_give_what_the_api_gives(env):
    args = ["ROMEO:", "-m", "shakespeare-char", "--n", "120", "--seed", "4", "--no-echo",
            "--frequency-penalty", "0.8", "--presence-penalty", "-0.3"]
    model = picogpt.load("shakespeare-char")
    options = dict(n=120, seed=4, frequency_penalty=0.8, presence_penalty=-0.3)
    full = model.generate("ROMEO:", **options)
    assert full != model.generate("ROMEO:", n=120, seed=4)  # the penalties change the text
    out = picogpt_cmd(*args, env=env)
    assert out.returncode == 0 and out.stdout == full + ("" if full.endswith("\n") else "\n")
    # `\n` on the command line is a newline; the text ends before the first stop string.
    assert "\n" in full[1:] and " " in full
    out = picogpt_cmd(*args, "--stop", "\\n", "--stop", "e ", env=env)
    expected = model.generate("ROMEO:", stop=["\n", "e "], **options)
    assert expected == full[: min(full.find(s) for s in ("\n", "e ") if s in full)]
    assert out.returncode == 0 and out.stdout == expected + "\n", out.stderr


def test_logprobs_piped_are_a_table_of_the_api_logprobs(env):
    out = picogpt_cmd("ROMEO:", "-m", "shakespeare-char", "--n", "15", "--seed", "2",
                      "--logprobs", "3", "--samples", "2", env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split("\t") == ["sample", "position", "token", "probability",
                                     "alternatives"]
    model = picogpt.load("shakespeare-char")
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == 30 and "\x1b" not in out.stdout
    for k in range(2):
        c = model.complete("ROMEO:", 15, seed=2 + k, logprobs=3)
        mine = [r for r in rows if r[0] == str(k + 1)]
        assert [r[1] for r in mine] == [str(i) for i in range(1, 16)]
        for row, token, lp, top in zip(mine, c.tokens, c.token_logprobs, c.top_logprobs):
            assert row[2] == json.dumps(model.decode([token]))
            assert math.isclose(float(row[3].rstrip("%")), 100 * math.exp(lp), abs_tol=0.006)
            assert row[4::2] == [json.dumps(t) for t in top]
            for shown, value in zip(row[5::2], top.values()):
                assert math.isclose(float(shown.rstrip("%")), 100 * math.exp(value),
                                    rel_tol=0.01, abs_tol=0.006)


def read_terminal(leader):
    """Everything a process wrote to a pseudo-terminal, until it closed it."""
    data = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(leader)
    return data.decode("utf-8")


def test_logprobs_on_a_terminal_shade_the_text_and_the_table(env):
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "picogpt", "ROMEO:", "-m", "shakespeare-char",
                             "--n", "20", "--seed", "3", "--logprobs", "2"],
                            stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    shown = read_terminal(leader)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    shown = shown.replace("\r\n", "\n")
    assert "\x1b[48;5;" in shown  # shaded
    plain = re.sub(r"\x1b\[[0-9;]*m", "", shown)
    text = picogpt.load("shakespeare-char").generate("ROMEO:", n=20, seed=3)
    assert plain.startswith("ROMEO:" + text)
    table = plain.split("alternatives\n", 1)[1].splitlines()
    assert len(table) == 20 and all(re.match(r" +\d+  \S", line) for line in table)


@pytest.mark.parametrize("dtype", [[], ["--dtype", "int8"]])
def test_a_terminal_is_told_what_loads_and_the_line_is_erased(env, dtype):
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "picogpt", "ROMEO:", "-m", "shakespeare-char",
                             "--n", "5", "--seed", "3", *dtype], stdout=subprocess.PIPE,
                            stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    err = read_terminal(leader)
    out = proc.stdout.read().decode("utf-8")
    assert proc.wait(timeout=60) == 0, err
    folder = picogpt.resolve("shakespeare-char")
    said = f"loading {folder}" + (" as int8" if dtype else "") + " ..."
    assert err == said + "\r\x1b[K"  # said while loading, erased after: nothing else
    assert out == "ROMEO:" + picogpt.load(folder, dtype=(dtype or [None, None])[1]).generate(
        "ROMEO:", n=5, seed=3) + "\n"
    piped = picogpt_cmd("ROMEO:", "-m", "shakespeare-char", "--n", "5", "--seed", "3", *dtype,
                        env=env)  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout == out


def test_chat_stop_strings_end_the_reply(ready_env, tmp_path):
    out = picogpt_cmd("chat", "--n", "20", "--seed", "5", "--stop", "e", "--stop", "a",
                      env=ready_env, input="hello there\n")
    assert out.returncode == 0, out.stderr
    model = picogpt.load(str(tmp_path / "weights" / "124M"))
    prompt = Conversation(model, 20).prompt("hello there")
    reply = model.generate(prompt, n=20, seed=5, temperature=0.7, stop=["\n", "e", "a"])
    full = model.generate(prompt, n=20, seed=5, temperature=0.7)
    assert reply != full  # a stop string did end it
    assert out.stdout.splitlines()[1] == "gpt2> " + (reply.lstrip() or "...")


# --- a model whose weights give non-finite logits ----------------------------------------------

@pytest.mark.parametrize("damage, command", [
    (with_a_nan, ["Hello", "--n", "3"]),
    (with_a_nan, ["eval", "text.txt"]),
    (with_a_nan, ["chat"]),
    # The case, with a prefill long enough to run on the pool's threads.
    (big_endian_over_little, ["a prompt of more than eight tokens", "--threads", "2"]),
])
def test_damaged_weights_are_one_line_and_exit_1(tmp_path, damage, command):
    folder = damage(tmp_path / "damaged")
    (tmp_path / "text.txt").write_text("Some text to score.\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), PICOGPT_WEIGHTS=str(tmp_path / "weights"),
               PYTHONIOENCODING="utf-8")
    out = picogpt_cmd(*command, "--model", str(folder), env=env, input="Hi!\n", cwd=tmp_path)
    assert_clean_failure(out, 1)
    assert out.stderr.startswith(f"picogpt: {folder}: its weights give logits that are not "
                                 "finite numbers"), out.stderr
    assert "picogpt verify" in out.stderr and "Warning" not in out.stderr, out.stderr
