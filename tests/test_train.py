"""Training: the model's gradients against finite differences and PyTorch's autograd, the
optimizer against PyTorch, the schedule and batches, and the training loop end to end: saving,
loading in the engine, resuming, surviving a crash mid-save, and the command's errors."""

import errno
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _gradcheck import assert_close, check_layer, numerical_grad, randn
from _reference import hf_model, hf_names

import picogpt
import picogpt.training.data
import picogpt.training.optimizer
from picogpt.errors import TrainingError
from picogpt.formats import tf_checkpoint as checkpoint
from picogpt.gpt2 import network
from picogpt.tokenizers import GPT2_VOCABULARY
from picogpt.tokenizers.bpe import BPE
from picogpt.tokenizers.chars import CharTokenizer
from picogpt.training.config import DEFAULTS, FINETUNE_DEFAULTS, make_config
from picogpt.training.data import encode, get_batch, split_data, vocabulary_files
from picogpt.training.loop import Trainer, evaluations_left, train
from picogpt.training.optimizer import AdamW, clip_grad_norm, learning_rate
from picogpt.training.prepare import prepare


def tiny_hparams(**overrides):
    return {"n_vocab": 7, "n_ctx": 6, "n_embd": 8, "n_head": 2, "n_layer": 2, **overrides}


def tiny_params(hparams, dtype=np.float64, seed=0):
    _, params = network.flat_views(network.param_shapes(hparams), dtype)
    network.init_params(params, hparams, np.random.default_rng(seed))
    rng = np.random.default_rng(seed + 1)
    for array in params.values():  # make biases and gains matter too
        array += rng.normal(0, 0.1, array.shape)
    return params


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_block_backward_with_its_residuals(dropout):
    hparams = tiny_hparams()
    params = tiny_params(hparams)
    names = [n for n in params if n.startswith("model/h0/")]
    B, T = 2, 4

    def forward(x, *values):
        p = dict(zip(names, values))
        rng = np.random.default_rng(5)  # the same dropout masks every time
        p = network.block_params({**params, **p}, 0)
        return network.block_forward(x, p, B, T, 2, dropout, rng)

    def backward(d, res, grads):
        return (network.block_backward(d, res[1], network.block_params(dict(zip(names, values)), 0),
                                  network.block_params(dict(zip(names, grads)), 0)),)  # fmt: skip

    values = [params[n] for n in names]
    check_layer(forward, backward, [randn(B * T, 8)], values)


# --- the whole model ----------------------------------------------------------------------------


def model_gradients(params, hparams, idx, targets):
    grads = {name: np.zeros_like(p) for name, p in params.items()}
    loss, cache = network.gpt_forward(params, hparams, idx, targets, grads=grads)
    network.gpt_backward(cache, params, hparams, grads)
    return loss, grads


def test_whole_model_gradients_match_finite_differences():
    hparams = tiny_hparams()
    params = tiny_params(hparams)
    rng = np.random.default_rng(3)
    idx, targets = rng.integers(0, 7, (2, 6)), rng.integers(0, 7, (2, 6))
    _, grads = model_gradients(params, hparams, idx, targets)
    for name, p in params.items():
        numeric = numerical_grad(lambda: network.gpt_forward(params, hparams, idx, targets)[0], p)
        assert_close(grads[name], numeric)


def assert_gradients_match_pytorch(hparams, idx, targets):
    """The loss and every parameter's gradient against torch autograd on HuggingFace's GPT-2
    (float64 on both sides), within 1e-4 relative."""
    params = tiny_params(hparams, np.float32)
    hf, torch = hf_model(params, hparams)
    hf = hf.double()
    logits = hf(torch.tensor(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, hparams["n_vocab"]),
                                             torch.tensor(targets).view(-1))  # fmt: skip
    loss.backward()
    torch_grads = {name: p.grad.numpy() for name, p in hf.named_parameters()}

    ours_loss, grads = model_gradients({k: v.astype(np.float64) for k, v in params.items()},
                                       hparams, idx, targets)  # fmt: skip
    assert ours_loss == pytest.approx(loss.item(), rel=1e-10)
    pairs = hf_names(hparams["n_layer"])
    assert set(pairs) == set(params)
    for ours, theirs in pairs.items():
        expected = torch_grads[theirs].reshape(grads[ours].shape)
        error = np.abs(grads[ours] - expected).max() / np.abs(expected).max()
        assert error < 1e-4, (ours, error)


def test_whole_model_gradients_match_pytorch_autograd():
    hparams = {"n_vocab": 11, "n_ctx": 16, "n_embd": 16, "n_head": 4, "n_layer": 3}
    rng = np.random.default_rng(4)
    assert_gradients_match_pytorch(hparams, rng.integers(0, 11, (3, 16)),
                                   rng.integers(0, 11, (3, 16)))  # fmt: skip


def test_float32_training_step_matches_float64():
    hparams = tiny_hparams(n_embd=16, n_head=4)
    params64 = tiny_params(hparams)
    params32 = {k: v.astype(np.float32) for k, v in params64.items()}
    rng = np.random.default_rng(6)
    idx, targets = rng.integers(0, 7, (4, 6)), rng.integers(0, 7, (4, 6))
    loss64, g64 = model_gradients(params64, hparams, idx, targets)
    loss32, g32 = model_gradients(params32, hparams, idx, targets)
    assert all(g.dtype == np.float32 for g in g32.values())  # no silent float64 on the fast path
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in g64:
        assert np.abs(g32[name] - g64[name]).max() <= 1e-4 * np.abs(g64[name]).max() + 1e-7


# --- optimizer and schedule ---------------------------------------------------------------------


@pytest.mark.parametrize("block", [7, 1 << 15])  # blocks across the decayed matrices' end; one
def test_adamw_and_clipping_match_pytorch(block, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(picogpt.training.optimizer, "ADAM_BLOCK", block)
    shapes = {"w": (5, 4), "b": (4,)}
    flat, views = network.flat_views(shapes, np.float64)
    flat[:] = np.random.default_rng(7).normal(size=flat.size)
    tensors = [torch.tensor(views[n].copy(), requires_grad=True) for n in shapes]
    ours = AdamW(flat, network.n_decayed(shapes), beta1=0.9, beta2=0.99, weight_decay=0.1)
    theirs = torch.optim.AdamW([{"params": tensors[:1], "weight_decay": 0.1},
                                {"params": tensors[1:], "weight_decay": 0.0}],
                               lr=1e-2, betas=(0.9, 0.99), eps=1e-8)  # fmt: skip
    rng = np.random.default_rng(8)
    for step in range(6):
        grad = rng.normal(size=flat.size) * (10 if step % 2 else 0.1)  # clipped every other step
        for t, g in zip(tensors, np.split(grad, [20])):
            t.grad = torch.tensor(g.reshape(t.shape))
        torch_norm = torch.nn.utils.clip_grad_norm_(tensors, 1.0).item()
        assert clip_grad_norm(grad, 1.0) == pytest.approx(torch_norm, rel=1e-12)
        lr = 1e-2 * (step + 1) / 6
        for group in theirs.param_groups:
            group["lr"] = lr
        theirs.step()
        ours.update(grad, lr)
        for t, name in zip(tensors, shapes):
            np.testing.assert_allclose(views[name], t.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_learning_rate_schedule():
    def lr(it):
        return learning_rate(it, 1e-3, 1e-4, warmup_iters=10, lr_decay_iters=110)

    warmup = [lr(i) for i in range(11)]
    assert warmup == sorted(warmup) and warmup[0] < 2e-4
    assert lr(10) == pytest.approx(1e-3)
    assert lr(60) == pytest.approx(0.5 * (1e-3 + 1e-4))  # halfway down the cosine
    decay = [lr(i) for i in range(10, 111)]
    assert decay == sorted(decay, reverse=True)
    assert lr(110) == lr(500) == 1e-4


def test_batches_are_shifted_windows_and_seeded():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 8, 5, np.random.default_rng(1))
    assert x.shape == y.shape == (5, 8)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    np.testing.assert_array_equal(np.diff(x, axis=1), 1)
    x2, _ = get_batch(data, 8, 5, np.random.default_rng(1))
    np.testing.assert_array_equal(x, x2)
    train, val = split_data(data)
    assert len(train) == 900 and val[0] == 900


# --- training end to end --------------------------------------------------------------------------

TEXT = "".join(
    f"{name}: {line}\n\n"
    for name, line in [("ROMEO", "But soft, what light through yonder window breaks?"),
                       ("JULIET", "O Romeo, Romeo, wherefore art thou Romeo?"),
                       ("MERCUTIO", "A plague o' both your houses!"),
                       ("NURSE", "Faith, I can cut a caper.")] * 40
)  # fmt: skip
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
         "--batch-size", "8", "--eval-interval", "20", "--eval-iters", "4", "--warmup-iters", "10",
         "--lr", "3e-3"]  # fmt: skip


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def train_cli(*args, check=True):
    out = subprocess.run([sys.executable, "-m", "picogpt", "train", *map(str, args)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_train_saves_a_model_the_engine_runs(text_file, tmp_path):
    out_dir = tmp_path / "model"
    result = train_cli(text_file, "--out", out_dir, "--max-iters", "60", *SMALL)
    assert "val loss" in result.stdout and "ms/iter" in result.stdout

    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [0, 20, 40, 60]
    assert set(log[0]) == {"iter", "train_loss", "val_loss", "ms_per_iter"}
    assert log[0]["val_loss"] == pytest.approx(math.log(len(set(TEXT))), abs=0.1)  # a fresh model
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0  # that learned
    config = json.loads((out_dir / "train_config.json").read_text())
    assert config["command"].startswith("picogpt train ") and "--n-embd 32" in config["command"]

    model = picogpt.load(out_dir)
    assert model.hparams == {"n_vocab": len(set(TEXT)), "n_ctx": 32, "n_embd": 32, "n_head": 2,
                             "n_layer": 2}  # fmt: skip
    # The engine's forward pass and training's give the same logits for the saved weights.
    params = checkpoint.read(out_dir)
    ids = model.encode("ROMEO: But soft, what light")
    loss, _ = network.gpt_forward(params, model.hparams, np.array([ids[:-1]]), np.array([ids[1:]]))
    engine = model.logits(ids[:-1]).astype(np.float64)
    log_probs = engine - engine.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    assert loss == pytest.approx(-log_probs[np.arange(len(ids) - 1), ids[1:]].mean(), rel=1e-5)
    text = model.generate("ROMEO:", n=80, seed=1)
    assert len(text) == 80 and set(text) <= set(TEXT)

    gen = subprocess.run([sys.executable, "-m", "picogpt", "--model", str(out_dir), "JULIET:",
                          "--n", "40", "--seed", "2"], capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("JULIET:") and len(gen.stdout) >= len("JULIET:") + 40


def test_best_model_is_kept_and_old_checkpoints_removed(text_file, tmp_path):
    out_dir = tmp_path / "model"
    train_cli(text_file, "--out", out_dir, "--max-iters", "40", *SMALL)
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    best = min(log, key=lambda r: r["val_loss"])
    assert sorted(p.name for p in out_dir.glob("model.ckpt-*")) == [
        f"model.ckpt-{best['iter']}.data-00000-of-00001", f"model.ckpt-{best['iter']}.index"]
    assert len(list((out_dir / "resume").glob("state.ckpt-*.index"))) == 1


def test_resume_continues_exactly_where_it_stopped(text_file, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # The same schedule for both (by default the decay ends at --max-iters).
    train_cli(text_file, "--out", straight, "--max-iters", "40", "--lr-decay-iters", "40", *SMALL)
    train_cli(text_file, "--out", split, "--max-iters", "20", "--lr-decay-iters", "40", *SMALL)
    result = train_cli(text_file, "--out", split, "--resume", "--max-iters", "40")
    assert "resuming at iter 20" in result.stdout
    a, b = checkpoint.read(straight / "resume"), checkpoint.read(split / "resume")
    assert int(b["train/iter"]) == 40
    for name in a:  # the same batches, the same optimizer state: the same numbers
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    lines = (split / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [0, 20, 40]  # 20 not repeated
    done = train_cli(text_file, "--out", split, "--resume", "--max-iters", "40")
    assert "resuming at iter 40, which is --max-iters 40 or more: nothing to train" in done.stdout
    assert (split / "train_log.jsonl").read_text().splitlines() == lines


def test_a_crash_while_saving_leaves_the_last_good_model(text_file, tmp_path, monkeypatch):
    """Fault injection: the second save dies just before its last rename (the `checkpoint` file
    that names the new weights); the folder must still load the first save, bit for bit."""
    plan = prepare(text_file, tmp_path / "model", small_options(max_iters=20))
    trainer = Trainer(plan.config, plan.hparams, plan.tokenizer, plan.folder, plan.vocabulary)
    trainer.initialize()
    trainer.save_model(3.0)
    saved = {k: v.copy() for k, v in trainer.params.items()}
    trainer.step(*get_batch(plan.data[0], 32, 8, np.random.default_rng(0)), 1e-2, None)
    trainer.iter = 20

    real_replace = os.replace

    def dying_replace(src, dst):
        if os.path.basename(dst) == "checkpoint":
            raise KeyboardInterrupt  # killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_model(2.0)
    monkeypatch.undo()
    model = picogpt.load(tmp_path / "model")
    params = checkpoint.read(tmp_path / "model")
    checkpoint.verify(tmp_path / "model")
    for name, value in saved.items():
        np.testing.assert_array_equal(params[name], value)
    assert model.generate("ROMEO:", n=5, seed=0)


def small_options(**extra):
    """SMALL as the options make_config takes: key -> value."""
    keys = [flag[2:].replace("-", "_") for flag in SMALL[::2]]
    values = [float(v) if "e" in v or "." in v else int(v) for v in SMALL[1::2]]
    return {**dict(zip(keys, values)), **extra}


@pytest.mark.parametrize("max_iters, interval", [(100, 20), (50, 20), (7, 1), (5, 10)])
def test_evaluations_left_counts_each_one_still_due(max_iters, interval):
    for it in range(max_iters + 2):
        due = [i for i in range(it, max_iters + 1) if i % interval == 0 or i == max_iters]
        assert evaluations_left(it, max_iters, interval) == len(due), it


def test_training_says_what_it_does_between_steps_and_counts_it_in_the_eta(text_file, tmp_path):
    plan = prepare(text_file, tmp_path / "model", small_options(max_iters=25))
    trainer = Trainer(plan.config, plan.hparams, plan.tokenizer, plan.folder, plan.vocabulary)
    trainer.initialize()
    events = []
    train(trainer, plan.data, report=lambda line: events.append(("report", line)),
          status=lambda *args: events.append(("status", args)),
          busy=lambda what: events.append(("busy", what)))  # fmt: skip
    first = [e for e in events if e[0] != "status"][:4]
    assert first == [("busy", "evaluating at iter 0"), ("busy", "saving the model of iter 0"),
                     ("busy", "saving the resume state of iter 0"), first[3]]  # fmt: skip
    assert first[3][0] == "report" and first[3][1].startswith("iter  0: train loss")
    statuses = [args for kind, args in events if kind == "status"]
    assert [s[0] for s in statuses] == list(range(1, 26))
    for it, max_iters, _, ms, eta in statuses:  # evaluations to come at iters 20 and 25
        assert eta > (max_iters - it) * ms / 1e3


# --- the command's errors -------------------------------------------------------------------------


def test_refuses_to_overwrite_a_model(text_file, tmp_path):
    out_dir = tmp_path / "model"
    train_cli(text_file, "--out", out_dir, "--max-iters", "0", *SMALL)
    again = train_cli(text_file, "--out", out_dir, "--max-iters", "10", check=False)
    assert again.returncode == 2 and "already holds a model" in again.stderr
    assert "Traceback" not in again.stderr


def test_resume_refuses_a_damaged_state(text_file, tmp_path):
    out_dir = tmp_path / "model"
    train_cli(text_file, "--out", out_dir, "--max-iters", "0", *SMALL)
    data = next((out_dir / "resume").glob("*.data-*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    result = train_cli(text_file, "--out", out_dir, "--resume", check=False)
    assert result.returncode == 2 and "cannot resume" in result.stderr and "CRC" in result.stderr


def test_resume_refuses_a_new_shape_and_unknown_characters(text_file, tmp_path):
    out_dir = tmp_path / "model"
    train_cli(text_file, "--out", out_dir, "--max-iters", "0", *SMALL)
    shape = train_cli(text_file, "--out", out_dir, "--resume", "--n-embd", "64", check=False)
    assert shape.returncode == 2 and "--n-embd 64" in shape.stderr
    other = tmp_path / "other.txt"
    other.write_text(TEXT + "Zebra quagga ☃\n", encoding="utf-8")
    chars = train_cli(other, "--out", out_dir, "--resume", check=False)
    assert chars.returncode == 2 and "'☃'" in chars.stderr and "'Z'" in chars.stderr


@pytest.mark.parametrize("args, message, status", [
    (["missing.txt"], "training text does not exist", 2),
    (["{empty}"], "the training text is empty", 2),
    (["{latin1}"], "is not UTF-8 text (byte offset 9)", 2),
    (["/dev/zero"], "is not a regular file", 2),
    (["{text}", "--out", "{empty_dir}", "--resume"], "nothing to resume (an empty folder)", 2),
    (["{text}", "--n-embd", "30", "--n-head", "4"], "not divisible", 2),
    (["{text}", "--block-size", "1000"], "too short", 2),
    (["{text}", "--dropout", "1.5"], "[0, 1)", 2),
    (["{text}", "--seed", "-1"], "--seed: must be >= 0, got -1", 2),
    (["{text}", "--grad-accum", "0"], "--grad-accum: must be at least 1, got 0", 2),
    (["{text}", "--lr", "nan"], "--lr: expected a finite number", 2),
    (["{text}", "--lr", "-1"], "--lr: must be >= 0, got -1", 2),
    (["{text}", "--resume"], "nothing to resume", 2),
    (["{text}", "--out", "{text}"], "is a file", 2),
    (["{text}", "--init", "no-such-model"], "no model 'no-such-model': not a folder", 2),
    (["{text}", "--tokenizer", "gpt3"], "no model 'gpt3': not a folder", 2),
    (["{text}", "--init", "shakespeare-char", "--resume"], "give one of them", 2),
])  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(text_file, tmp_path, args, message, status):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "latin1.txt").write_bytes("Hello caf\xe9 world".encode("latin-1") * 50)
    args = [a.format(text=text_file, empty=tmp_path / "empty.txt", latin1=tmp_path / "latin1.txt",
                     empty_dir=tmp_path / "empty_dir") for a in args]  # fmt: skip
    result = train_cli(*args, *([] if "--out" in args else ["--out", tmp_path / "m"]), check=False)
    assert result.returncode == status and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "m" / "hparams.json").exists()


def test_engine_does_not_import_training():
    code = ("import sys, picogpt; from picogpt import cli; picogpt.load(sys.argv[1])"
            ".generate('a', n=3); print('picogpt.training' in sys.modules)")
    tiny = Path(__file__).parent / "fixtures" / "gpt2-tiny"
    out = subprocess.run([sys.executable, "-c", code, str(tiny)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc, Linux's counts")
def test_a_trainer_reuses_its_steps_memory_instead_of_faulting_it_in_again(tmp_path):
    # A fresh process: keep_freed_memory is process-wide, and another test may have called it.
    # Without it glibc hands each step's freed activations back to the kernel, and the next step
    # faults them in anew, thousands of pages a step (about 8,000 here, 30% of the step's time).
    code = """if True:
        import resource, sys
        import numpy as np
        from picogpt.training.config import ARCHITECTURE, DEFAULTS
        from picogpt.training.loop import Trainer
        from picogpt.training.run_folder import RunFolder
        hparams = {"n_vocab": 65, "n_ctx": 64, "n_embd": 128, "n_head": 4, "n_layer": 4}
        config = {**DEFAULTS, **{k: hparams[k] for k in ARCHITECTURE}, "block_size": 64,
                  "batch_size": 12}
        trainer = Trainer(config, hparams, None, RunFolder(sys.argv[1], []), {})
        trainer.initialize()
        rng = np.random.default_rng(0)
        for i in range(8):
            if i == 3:  # after the warm-up steps
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            ids = rng.integers(0, 65, (12, 65))
            trainer.step(ids[:, :-1], ids[:, 1:], 1e-4, rng)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 5)
    """
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert float(out.stdout) < 100, f"{out.stdout.strip()} page faults a step"


def test_every_resume_state_saves_the_configuration_it_goes_with(text_file, tmp_path):
    plan = prepare(text_file, tmp_path / "m", small_options(max_iters=3, lr=2e-3))
    trainer = Trainer(plan.config, plan.hparams, plan.tokenizer, plan.folder, plan.vocabulary)
    trainer.initialize()
    trainer.best_val_loss = -math.inf  # no evaluation improves: no model is saved
    train(trainer, plan.data, report=lambda line: None)
    assert trainer.saved_model is None and trainer.saved_iter == 3
    saved = json.loads((tmp_path / "m" / "train_config.json").read_text())
    assert saved["max_iters"] == 3 and saved["lr"] == 2e-3  # what the next --resume keeps


def test_a_constant_learning_rate_stays_constant_when_resumed_with_another():
    saved = {**DEFAULTS, **FINETUNE_DEFAULTS, "lr": 3e-5, "min_lr": 3e-5}  # a fine-tune's
    options = dict.fromkeys(DEFAULTS)
    assert make_config({**options, "lr": 1e-5}, saved)["min_lr"] == 1e-5
    assert make_config({**options, "lr": 1e-5, "min_lr": 1e-6}, saved)["min_lr"] == 1e-6
    decaying = {**DEFAULTS, "lr": 1e-3, "min_lr": 1e-4}  # from scratch: min_lr its own
    assert make_config({**options, "lr": 2e-3}, decaying)["min_lr"] == 1e-4
    with pytest.raises(TrainingError, match=r"--min-lr 0.0001 is above --lr 5e-05 \(--min-lr's "
                                            r"default value"):  # fmt: skip
        make_config({**options, "lr": 5e-5})


def test_resume_keeps_its_tokenizer_and_refuses_another(text_file, tmp_path):
    out = tmp_path / "m"
    train_cli(text_file, "--out", out, "--max-iters", "0", *SMALL)  # characters
    for same in (None, "chars"):
        assert prepare(text_file, out, small_options(), resume=True, tokenizer=same).resume
    with pytest.raises(TrainingError, match="--tokenizer gpt2: the run being resumed was "
                                            "trained with --tokenizer chars"):  # fmt: skip
        prepare(text_file, out, small_options(), resume=True, tokenizer="gpt2")
    result = train_cli(text_file, "--out", out, "--resume", "--tokenizer", "gpt2", check=False)
    assert result.returncode == 2 and "cannot change" in result.stderr


def test_a_reader_that_leaves_stops_training_quietly(text_file, tmp_path):
    out = tmp_path / "m"
    command = [sys.executable, "-m", "picogpt", "train", str(text_file), "--out", str(out),
               "--max-iters", "100000", "--log-interval", "1", *SMALL]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while b" 0: train loss" not in proc.stdout.readline():  # the first evaluation, saved
            pass
        proc.stdout.close()  # `| head`: the reader leaves
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and err == "", err
    assert prepare(text_file, out, small_options(), resume=True).resume  # whole, resumable


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(text_file, tmp_path):
    import signal

    out_dir = tmp_path / "model"
    command = [sys.executable, "-m", "picogpt", "train", str(text_file), "--out", str(out_dir),
               "--max-iters", "100000", *SMALL]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any(" 20: train loss" in line for line in lines):  # an evaluation, some steps
            lines.append(proc.stdout.readline())
            assert lines[-1], "training ended early"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at iter" in out and "--resume" in out
    assert picogpt.load(out_dir).generate("ROMEO:", n=5, seed=0)


# --- the folder: picogpt replaces or deletes only what it wrote (issue 11, findings 1 and 10) -----


def run_train(capsys, *args):
    """`picogpt train ARGS` in this process: (exit status, stdout, stderr)."""
    from picogpt import cli

    try:
        status = cli.main(["train", *map(str, args)])
    except SystemExit as e:  # argparse's verdict on the arguments
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def folder_bytes(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_foreign_folder_is_refused_and_left_untouched(text_file, tmp_path, capsys):
    """Someone's TensorFlow run (checkpoints, a `checkpoint` file, no hparams.json) in --out:
    nothing in it is deleted or overwritten, by a new run or by --resume."""
    theirs = tmp_path / "their-run"
    (theirs / "eval").mkdir(parents=True)
    for name, data in {"model.ckpt-1000.index": b"index", "checkpoint": b'model_checkpoint_path: '
                       b'"model.ckpt-1000"\n', "model.ckpt-1000.data-00000-of-00001": b"weights",
                       "model.ckpt-900.index": b"older", "eval/events": b"log",
                       "hparams.json.tmp1": b"not ours either"}.items():  # fmt: skip
        (theirs / name).write_bytes(data)
    before = folder_bytes(theirs)
    for extra in ([], ["--resume"]):
        status, out, err = run_train(capsys, text_file, "--out", theirs, "--max-iters", "0",
                                     *SMALL, *extra)  # fmt: skip
        assert status == 2 and "not a picogpt training folder" in err, err
        assert err.count("\n") == 1 and out == ""
        assert folder_bytes(theirs) == before


def test_a_new_run_takes_an_empty_folder_and_records_its_files(text_file, tmp_path, capsys):
    out_dir = tmp_path / "empty"
    out_dir.mkdir()
    status, _, err = run_train(capsys, text_file, "--out", out_dir, "--max-iters", "20", *SMALL)
    assert status == 0, err
    record = json.loads((out_dir / "train_files.json").read_text())
    on_disk = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()}
    assert set(record["files"]) == on_disk  # everything there is recorded, nothing else
    # A file of the user's dropped in later is not picogpt's to delete.
    (out_dir / "model.ckpt-5.index").write_bytes(b"the user's")
    status, _, err = run_train(capsys, text_file, "--out", out_dir, "--resume", "--max-iters", "40")
    assert status == 0, err
    assert (out_dir / "model.ckpt-5.index").read_bytes() == b"the user's"


@pytest.mark.parametrize("saved, message", [
    ([1, 2], "expected a JSON object, got list"),
    ({"n_head": 0}, "n_head: must be at least 1, got 0"),
    ({"eval_interval": 0}, "eval_interval: must be at least 1, got 0"),
    ({"lr": "fast"}, 'lr: expected a number, got "fast"'),
    ({"seed": -1}, "seed: must be >= 0, got -1"),
    ({"max_iters": 2.5}, "max_iters: expected a whole number, got '2.5'"),
    ({"dropout": True}, "dropout: expected a number, got true"),
])  # fmt: skip
def test_resume_checks_the_saved_configuration(text_file, tmp_path, capsys, saved, message):
    out_dir = tmp_path / "model"
    assert run_train(capsys, text_file, "--out", out_dir, "--max-iters", "0", *SMALL)[0] == 0
    path = out_dir / "train_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps(saved if isinstance(saved, list) else {**config, **saved}))
    status, _, err = run_train(capsys, text_file, "--out", out_dir, "--resume")
    assert status == 2 and message in err and err.count("\n") == 1, err


def test_resume_starts_over_when_the_first_save_never_finished(text_file, tmp_path, capsys):
    """What a kill during the very first save leaves: picogpt's record and some of its files,
    temporaries of a process that is gone, no `checkpoint` and no resume state. --resume starts
    over (and says so), a new run may take the folder too, and the temporaries go."""
    out_dir = tmp_path / "model"
    assert run_train(capsys, text_file, "--out", out_dir, "--max-iters", "0", *SMALL)[0] == 0
    dead = 4_999_999  # above Linux's largest pid: no such process
    shutil.rmtree(out_dir / "resume")
    (out_dir / "checkpoint").rename(out_dir / f"checkpoint.tmp{dead}")
    (out_dir / f"hparams.json.tmp{dead}").write_text("{")
    (out_dir / "resume").mkdir()
    (out_dir / "resume" / f"checkpoint.tmp{dead}").write_text("half")
    for extra in (["--resume"], []):
        status, out, err = run_train(capsys, text_file, "--out", out_dir, "--max-iters", "20",
                                     *SMALL, *extra)  # fmt: skip
        assert status == 0, err
        if extra:
            assert "starting over" in err and "no complete training state" in err
            assert not list(out_dir.rglob(f"*.tmp{dead}"))
            assert len(list(out_dir.glob("model.ckpt-*.index"))) == 1
            shutil.rmtree(out_dir / "resume")  # again half-saved, for the run without --resume
            (out_dir / "checkpoint").unlink()
    assert picogpt.load(out_dir).generate("ROMEO:", n=5, seed=0)


# --- --resume checks the folder against its state (issue 23, finding 6) ---------------------------


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text())), ensure_ascii=False))


@pytest.mark.parametrize("name, change, message", [
    ("chars.json", lambda chars: chars + ["\u2603"],
     "chars.json: tokens is {n_chars_plus_1} in the folder, {n_chars} in the resume state"),
    ("chars.json", lambda chars: chars[1:2] + chars[:1] + chars[2:],
     "chars.json holds other tokens than the resume state's"),
    ("train_config.json", lambda config: {**config, "n_embd": 64},
     "train_config.json: n_embd is 64 in the folder, 32 in the resume state"),
    ("hparams.json", lambda hparams: {**hparams, "n_head": 1},
     "hparams.json: n_head is 1 in the folder, 2 in the resume state"),
])  # fmt: skip
def test_resume_refuses_a_folder_edited_since_its_state(text_file, tmp_path, capsys, name,
                                                        change, message):
    """Edited by hand after the run: resuming would train one model and save another (or a
    folder that does not load). Refused before anything is written, naming file and field."""
    out_dir = tmp_path / "model"
    assert run_train(capsys, text_file, "--out", out_dir, "--max-iters", "20", *SMALL)[0] == 0
    edit_json(out_dir / name, change)
    before = folder_bytes(out_dir)
    status, out, err = run_train(capsys, text_file, "--out", out_dir, "--resume",
                                 "--max-iters", "40")  # fmt: skip
    n_chars = len(set(TEXT))
    assert status == 2 and err.count("\n") == 1 and "cannot resume" in err, err
    assert message.format(n_chars=n_chars, n_chars_plus_1=n_chars + 1) in err, err
    assert folder_bytes(out_dir) == before and out == ""


def drop_state_record(out_dir):
    """The resume state as picogpt wrote it before the state recorded its folder."""
    prefix = checkpoint.resolve_prefix(out_dir / "resume")
    tensors = {k: np.array(v) for k, v in checkpoint.read(prefix).items() if k != "train/folder"}
    assert len(tensors) < len(checkpoint.read(prefix))
    checkpoint.write(prefix, tensors)


def test_an_old_state_without_its_record_resumes_and_is_checked(text_file, tmp_path, capsys):
    out_dir = tmp_path / "model"
    assert run_train(capsys, text_file, "--out", out_dir, "--max-iters", "20", *SMALL)[0] == 0
    drop_state_record(out_dir)
    for name, change, message in [
        ("chars.json", lambda chars: chars + ["\u2603"],
         f"chars.json: {len(set(TEXT)) + 1} tokens, hparams.json's n_vocab is {len(set(TEXT))}"),
        ("train_config.json", lambda config: {**config, "n_embd": 64},
         "train_config.json: n_embd is 64, hparams.json's is 32"),
    ]:  # fmt: skip
        original = (out_dir / name).read_bytes()
        edit_json(out_dir / name, change)
        before = folder_bytes(out_dir)
        status, _, err = run_train(capsys, text_file, "--out", out_dir, "--resume",
                                   "--max-iters", "40")  # fmt: skip
        assert status == 2 and message in err and err.count("\n") == 1, err
        assert folder_bytes(out_dir) == before
        (out_dir / name).write_bytes(original)
    status, out, err = run_train(capsys, text_file, "--out", out_dir, "--resume",
                                 "--max-iters", "40")  # fmt: skip
    assert status == 0 and "resuming at iter 20" in out, err
    assert picogpt.load(out_dir).generate("ROMEO:", n=5, seed=0)


def test_starting_over_keeps_the_folders_recipe_and_its_models_architecture(text_file, tmp_path,
                                                                            capsys):
    """A full disk stopped the first save of the state (the model's went through): --resume
    starts over with the folder's own train_config.json, not the default recipe, and refuses
    to replace the saved model with another architecture."""
    out_dir = tmp_path / "model"
    assert run_train(capsys, text_file, "--out", out_dir, "--max-iters", "0", *SMALL)[0] == 0
    hparams = json.loads((out_dir / "hparams.json").read_text())
    shutil.rmtree(out_dir / "resume")  # no state ever completed
    status, out, err = run_train(capsys, text_file, "--out", out_dir, "--resume",
                                 "--max-iters", "20")  # fmt: skip
    assert status == 0 and "starting over with its own recipe" in err, err
    assert picogpt.load(out_dir).hparams == hparams
    config = json.loads((out_dir / "train_config.json").read_text())
    assert (config["n_embd"], config["batch_size"], config["max_iters"]) == (32, 8, 20)

    shutil.rmtree(out_dir / "resume")
    edit_json(out_dir / "train_config.json", lambda config: {**config, "n_embd": 64})
    before = folder_bytes(out_dir)
    status, _, err = run_train(capsys, text_file, "--out", out_dir, "--resume")
    assert status == 2 and err.count("\n") == 1, err
    assert "cannot start over" in err and "hparams.json: n_embd is 32 in the folder, 64 in this " \
        "run" in err, err  # fmt: skip
    other = tmp_path / "other.txt"  # another text, other characters: another vocabulary
    other.write_text(TEXT.replace("R", "r"), encoding="utf-8")
    edit_json(out_dir / "train_config.json", lambda config: {**config, "n_embd": 32})
    status, _, err = run_train(capsys, other, "--out", out_dir, "--resume")
    assert status == 2 and "chars.json: tokens is" in err, err
    assert folder_bytes(out_dir) == {**before, Path("train_config.json"):
                                     (out_dir / "train_config.json").read_bytes()}  # fmt: skip
    assert picogpt.load(out_dir).hparams == hparams


def test_a_failed_save_says_so_on_stderr_and_claims_no_success(text_file, tmp_path, capsys,
                                                              monkeypatch):
    """A full disk at the second evaluation's save: one error line on stderr naming what the
    folder still holds, exit 1, and no "best model ... in DIR" line; the first save loads."""
    out_dir = tmp_path / "model"
    real_write, calls = checkpoint.write, []

    def full_disk(prefix, tensors):
        calls.append(prefix)
        if len(calls) > 2:  # model and state at iter 0 went through
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(prefix, tensors)

    monkeypatch.setattr(checkpoint, "write", full_disk)
    status, out, err = run_train(capsys, text_file, "--out", out_dir, "--max-iters", "40", *SMALL)
    assert status == 1
    assert err.startswith("picogpt train: error: cannot save to ") and err.count("\n") == 1
    assert "No space left on device" in err and "the state of iter 0" in err, err
    assert "best model" not in out and "error" not in out
    monkeypatch.undo()
    assert picogpt.load(out_dir).generate("ROMEO:", n=5, seed=0)


# --- gradient accumulation, GPT-2's tokens, fine-tuning (issue 12) -------------------------------

TINY = Path(__file__).parent / "fixtures" / "gpt2-tiny"  # written by TensorFlow, n_ctx 64


def make_trainer(text_file, out, init=None, **options):
    base = small_options() if init is None else {}
    plan = prepare(text_file, out, {**base, **options}, init=init)
    trainer = Trainer(plan.config, plan.hparams, plan.tokenizer, plan.folder, plan.vocabulary)
    trainer.initialize(plan.init)
    return trainer, plan


def test_grad_accum_is_one_step_over_the_whole_batch(text_file, tmp_path):
    """4 micro-batches of 2 windows give the mean gradient of the 8 windows (float32 rounding)."""
    one, plan = make_trainer(text_file, tmp_path / "one", batch_size=8, grad_clip=0.0)
    four, _ = make_trainer(text_file, tmp_path / "four", batch_size=2, grad_accum=4,
                           grad_clip=0.0)  # fmt: skip
    x, y = get_batch(plan.data[0], 32, 8, np.random.default_rng(0))
    loss_one = one.step(x, y, 1e-3, None)
    loss_four = four.step(x, y, 1e-3, None)
    assert loss_four == pytest.approx(loss_one, rel=1e-6)
    scale = np.abs(one.flat_grad).max()
    assert np.abs(four.grad_sum - one.flat_grad).max() <= 1e-5 * scale
    # (The parameters after the step are not compared: AdamW's first step is about lr * sign(g),
    # which float32 rounding flips where g is near 0.)


def gpt2_vocabulary_folder(tmp_path):
    """A folder with GPT-2's real encoder.json and vocab.bpe (copies of the package's)."""
    folder = tmp_path / "gpt2-vocab"
    folder.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(GPT2_VOCABULARY / name, folder / name)
    return folder


def tiktoken_gpt2(folder):
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    from picogpt.tokenizers.bpe import GPT2_PATTERN

    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"),
                                                           str(folder / "encoder.json"))
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})  # fmt: skip


def test_text_ids_in_chunks_are_tiktokens_and_cached(tmp_path, monkeypatch):
    vocab = gpt2_vocabulary_folder(tmp_path)
    enc = tiktoken_gpt2(vocab)
    bpe = BPE.load(vocab)
    text = (TEXT + " naïve  café\n\n\t 12,345 don't  <|endoftext|>\u00a0\u3000end  ") * 7
    text += "🦜" * 200  # more tokens than characters
    # many cuts, at every kind of boundary
    monkeypatch.setattr(picogpt.training.data, "TOKENIZE_CHUNK", 50)
    seen = []
    files = vocabulary_files(bpe, vocab)
    ids = encode(text, bpe, tmp_path / "cache", files, lambda done, total: seen.append(done))
    assert ids.dtype == np.uint16 and ids.tolist() == enc.encode_ordinary(text)
    assert len(seen) > 10 and seen[-1] == len(text) and seen == sorted(seen)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1

    monkeypatch.setattr(BPE, "encode", lambda *a, **k: pytest.fail("tokenized again"))
    again = encode(text, bpe, tmp_path / "cache", files)
    np.testing.assert_array_equal(again, ids)
    chars = CharTokenizer.from_text(text)
    np.testing.assert_array_equal(encode(text, chars), chars.encode(text))


@pytest.mark.parametrize("tokenizer", ["gpt2", "a folder"])
def test_train_from_scratch_on_gpt2_tokens_offline(text_file, tmp_path, capsys, monkeypatch,
                                                   tokenizer):
    """`--tokenizer gpt2` is the vocabulary the package ships: no network, no 500 MB download
    (nothing listens at the base URL, and the weights folder gets only the text's ids)."""
    monkeypatch.setenv("PICOGPT_BASE_URL", "http://127.0.0.1:9")
    vocab = GPT2_VOCABULARY
    if tokenizer == "a folder":  # a folder that holds just a tokenizer lends it
        vocab = tokenizer = gpt2_vocabulary_folder(tmp_path)
    out_dir, weights = tmp_path / "bpe", tmp_path / "weights"
    status, out, err = run_train(capsys, text_file, "--out", out_dir, "--tokenizer", tokenizer,
                                 "--weights-dir", weights, "--max-iters", "2", "--eval-iters", "1",
                                 *SMALL)  # fmt: skip
    assert status == 0, err
    assert "a vocabulary of 50,257 tokens" in out
    for name in ("encoder.json", "vocab.bpe"):  # GPT-2's files, byte for byte
        assert (out_dir / name).read_bytes() == (vocab / name).read_bytes()
    model = picogpt.load(out_dir)
    assert model.hparams["n_vocab"] == 50257 and model.hparams["n_ctx"] == 32
    assert len(model.encode("ROMEO:")) < len("ROMEO:")  # tokens, not characters
    assert isinstance(model.generate("ROMEO:", n=3, seed=0), str)
    assert [p.name for p in weights.iterdir()] == ["tokens"]
    assert len(list((weights / "tokens").glob("*.npy"))) == 1


def test_fine_tuning_follows_pytorch_step_by_step(text_file, tmp_path):
    """10 steps from GPT-2 weights written by TensorFlow, on the training loop's own batches:
    picogpt's losses and HuggingFace's GPT-2 with torch.optim.AdamW's agree within 1e-3."""
    trainer, plan = make_trainer(text_file, tmp_path / "tuned", init=TINY, lr=1e-3, batch_size=4,
                                 grad_accum=2, block_size=32)  # fmt: skip
    c = plan.config
    assert (c["n_layer"], c["n_embd"], c["warmup_iters"], c["min_lr"]) == (2, 32, 0, 1e-3)
    assert (c["beta2"], c["dropout"], c["eval_interval"]) == (0.95, 0.0, 5)
    hf, torch = hf_model(checkpoint.read(TINY), plan.hparams)
    hf.train()
    decay = [p for p in hf.parameters() if p.dim() >= 2]
    no_decay = [p for p in hf.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(c["beta1"], c["beta2"]), eps=1e-8)  # fmt: skip
    losses = []
    for it in range(10):
        rng = np.random.default_rng([c["seed"], 0, it])  # as train draws them
        x, y = get_batch(plan.data[0], 32, 4 * c["grad_accum"], rng)
        ours = trainer.step(x, y, 1e-3, rng)
        mean_loss = 0.0
        for xi, yi in zip(np.split(x, c["grad_accum"]), np.split(y, c["grad_accum"])):
            logits = hf(torch.tensor(xi.astype(np.int64))).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     torch.tensor(yi.astype(np.int64)).view(-1))
            (loss / c["grad_accum"]).backward()
            mean_loss += loss.item() / c["grad_accum"]
        torch.nn.utils.clip_grad_norm_(hf.parameters(), c["grad_clip"])
        opt.step()
        opt.zero_grad()
        assert abs(ours - mean_loss) < 1e-3, (it, ours, mean_loss)
        losses.append(ours)
    assert losses[-1] < losses[0] - 0.2  # it learned


def test_a_fine_tuned_model_keeps_its_context_and_every_position(text_file, tmp_path, capsys):
    out_dir = tmp_path / "tuned"
    status, out, err = run_train(capsys, text_file, "--out", out_dir, "--init", TINY,
                                 "--block-size", "16", "--max-iters", "4", "--grad-accum", "2",
                                 "--eval-interval", "2", "--eval-iters", "2",
                                 "--lr", "1e-3")  # fmt: skip
    assert status == 0, err
    assert f"fine-tuning {TINY}" in out
    model = picogpt.load(out_dir)
    assert model.hparams == json.loads((TINY / "hparams.json").read_text())  # n_ctx 64 kept
    before, after = checkpoint.read(TINY), checkpoint.read(out_dir)
    assert after["model/wpe"].shape == (64, 32)
    assert not np.array_equal(after["model/wpe"][:16], before["model/wpe"][:16])
    # Positions 16..63 were never trained: only AdamW's weight decay touched them.
    ratio = after["model/wpe"][16:] / before["model/wpe"][16:]
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-5)
    assert 0.99 < ratio.flat[0] < 1
    assert (out_dir / "vocab.bpe").read_bytes() == (TINY / "vocab.bpe").read_bytes()
    assert len(model.generate("ROMEO:", n=70, seed=0)) > 0  # past the block size
    config = json.loads((out_dir / "train_config.json").read_text())
    assert f"--init {TINY}" in config["command"] and config["lr"] == config["min_lr"] == 1e-3
    # The result is a model like any other: --init again from it, --resume it.
    again = tmp_path / "again"
    assert run_train(capsys, text_file, "--out", again, "--init", out_dir, "--block-size", "16",
                     "--max-iters", "0", "--eval-iters", "1")[0] == 0  # fmt: skip
    assert run_train(capsys, text_file, "--out", out_dir, "--resume", "--max-iters", "6")[0] == 0


@pytest.mark.parametrize("args, message", [
    (["--init", str(TINY), "--n-layer", "3"], "--n-layer 3: the model of --init has 2"),
    (["--init", str(TINY), "--block-size", "65"], "--block-size 65 is more than the context"),
    (["--init", str(TINY), "--tokenizer", "gpt2"], "--tokenizer goes with a run from scratch"),
    (["--init", "shakespeare-char"], "outside this model's vocabulary of 65: '☃'"),
])  # fmt: skip
def test_fine_tuning_errors(text_file, tmp_path, capsys, args, message):
    text_file.write_text(TEXT + "☃\n", encoding="utf-8")
    status, _, err = run_train(capsys, text_file, "--out", tmp_path / "m", *args)
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_whole_model_gradients_with_gpt2s_vocabulary_match_pytorch():
    """The tied 50,257-row embedding: input and output gradients meet in one matrix."""
    hparams = {"n_vocab": 50257, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    rng = np.random.default_rng(10)
    idx, targets = rng.integers(0, 50257, (2, 16)), rng.integers(0, 50257, (2, 16))
    idx[0, :4] = targets[1, :4] = 7  # a token both read and predicted
    assert_gradients_match_pytorch(hparams, idx, targets)


def test_a_run_larger_than_the_machine_is_refused_before_it_starts(text_file, tmp_path, capsys):
    status, _, err = run_train(capsys, text_file, "--out", tmp_path / "m", "--n-layer", "48",
                               "--n-embd", "8192", "--n-head", "64", "--block-size", "32")
    assert status == 2 and err.count("\n") == 1, err
    needed = float(re.search(r"needs about ([\d.]+) GB", err).group(1))
    assert needed > 48 * 12 * 8192**2 * 4 * 4 / 1e9  # parameters, gradient, AdamW's two moments
    assert not (tmp_path / "m").exists()


# --- nanoGPT's token files, and a text too large to hold (issue 23, finding 7) --------------------


def tiny_ids(text=TEXT):
    from picogpt.tokenizers.bpe import BPE

    return np.array(BPE.load(TINY).encode(text), np.uint16)


def write_token_files(folder, train, val):
    """What nanoGPT's prepare.py writes: raw uint16 ids, no header."""
    folder.mkdir(exist_ok=True)
    np.asarray(train, np.uint16).tofile(folder / "train.bin")
    np.asarray(val, np.uint16).tofile(folder / "val.bin")
    return folder


def test_train_and_fine_tune_on_nanogpts_token_files(tmp_path, capsys):
    ids = tiny_ids()
    data = write_token_files(tmp_path / "data", ids[:-200], ids[-200:])
    plan = prepare(None, tmp_path / "m", small_options(), tokenizer=str(TINY), data=data)
    assert all(isinstance(split, np.memmap) for split in plan.data)  # mapped, not read
    np.testing.assert_array_equal(plan.data[1], ids[-200:])
    shutil.rmtree(tmp_path / "m")

    out_dir = tmp_path / "scratch"
    status, out, err = run_train(capsys, "--data", data, "--out", out_dir, "--tokenizer", TINY,
                                 "--max-iters", "2", "--eval-iters", "1", *SMALL)  # fmt: skip
    assert status == 0, err
    assert f"a vocabulary of 513 tokens, {len(ids) - 200:,} training and 200 validation" in out
    assert picogpt.load(out_dir).hparams["n_vocab"] == 513
    config = json.loads((out_dir / "train_config.json").read_text())
    assert config["command"].startswith(f"picogpt train --data {data} --out {out_dir} ")
    assert f"--data {data} --out {out_dir} --resume" in out
    status, out, err = run_train(capsys, "--data", data, "--out", out_dir, "--resume",
                                 "--max-iters", "4")  # fmt: skip
    assert status == 0 and "resuming at iter 2" in out, err

    status, out, err = run_train(capsys, "--data", data, "--out", tmp_path / "tuned", "--init",
                                 TINY, "--block-size", "16", "--max-iters", "2", "--eval-iters",
                                 "1", "--grad-accum", "1")  # fmt: skip
    assert status == 0 and f"fine-tuning {TINY}" in out, err


def test_a_token_file_with_an_id_outside_the_vocabulary_is_refused(tmp_path, capsys, monkeypatch):
    import picogpt.training.token_files as token_files

    monkeypatch.setattr(token_files, "CHECK_CHUNK", 7)  # checked in chunks: found in a later one
    ids = tiny_ids()
    val = ids[-200:].copy()
    val[123] = 513
    data = write_token_files(tmp_path / "data", ids[:-200], val)
    status, _, err = run_train(capsys, "--data", data, "--out", tmp_path / "m", "--tokenizer",
                               TINY, *SMALL)  # fmt: skip
    assert status == 2 and err.count("\n") == 1, err
    assert f"{data / 'val.bin'}: token id 513 at byte offset 246 is outside the vocabulary of " \
           "513" in err  # fmt: skip
    (data / "val.bin").write_bytes(b"\x01\x00\x02")
    status, _, err = run_train(capsys, "--data", data, "--out", tmp_path / "m", "--tokenizer", TINY)
    assert status == 2 and "3 bytes is not a whole number of 2-byte token ids" in err, err
    (data / "val.bin").unlink()
    status, _, err = run_train(capsys, "--data", data, "--out", tmp_path / "m", "--tokenizer", TINY)
    assert status == 2 and "val.bin: token file does not exist" in err, err
    write_token_files(data, ids[:20], ids[:20])
    status, _, err = run_train(capsys, "--data", data, "--out", tmp_path / "m", "--tokenizer",
                               TINY, *SMALL)  # fmt: skip
    assert status == 2 and "train.bin is too short for --block-size 32: 20 tokens" in err, err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("args, message", [
    (["{text}", "--data", "{data}"], "give a text file (TEXT) or --data DIR, one of them"),
    ([], "give a text file (TEXT) or --data DIR, one of them"),
    (["--data", "{data}", "--tokenizer", "chars"], "--data holds token ids, not characters"),
])  # fmt: skip
def test_text_and_data_are_one_or_the_other(text_file, tmp_path, capsys, args, message):
    data = write_token_files(tmp_path / "data", tiny_ids(), tiny_ids())
    args = [a.format(text=text_file, data=data) for a in args]
    status, _, err = run_train(capsys, *args, "--out", tmp_path / "m")
    assert status == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m").exists()


def test_train_help_explains_data(capsys):
    status, out, _ = run_train(capsys, "--help")
    assert status == 0 and "--data DIR" in out and "train.bin" in out and "uint16" in out


VARIED = "".join(f"{w}{'.' if i % 7 == 0 else ''}{chr(10) if i % 11 == 0 else ' '}"
                 for i, w in enumerate(("naïve café 12,345 don't ROMEO: 🦜🦜 über "
                                        "straße\t\tend " + TEXT).split(" ") * 3))  # fmt: skip


@pytest.mark.parametrize("workers", [1, 2])
def test_a_text_over_the_limit_is_tokenized_as_a_stream(tmp_path, monkeypatch, workers):
    """Cut into pieces (and read in blocks that split characters), on one process or several:
    the same ids as the whole text's, in a token file beside the cache, reused."""
    import picogpt.training.token_files as token_files
    from picogpt.tokenizers.bpe import BPE

    monkeypatch.setattr(picogpt.training.data, "TOKENIZE_CHUNK", 50)
    monkeypatch.setattr(token_files, "READ_BLOCK", 7)
    path = tmp_path / "big.txt"
    path.write_text(VARIED, encoding="utf-8")
    bpe = BPE.load(TINY)
    vocabulary = vocabulary_files(bpe, TINY)
    seen = []
    ids = token_files.tokenize_file(path, bpe, tmp_path / "tokens", vocabulary,
                                    lambda *a: seen.append(a), workers)  # fmt: skip
    assert isinstance(ids, np.memmap) and ids.tolist() == bpe.encode(VARIED)
    assert len(seen) > 10 and seen[-1][:2] == (path.stat().st_size,) * 2
    assert [p.suffix for p in (tmp_path / "tokens").iterdir()] == [".bin"]
    monkeypatch.setattr(token_files, "_encode_pieces", lambda *a: pytest.fail("tokenized again"))
    again = token_files.tokenize_file(path, bpe, tmp_path / "tokens", vocabulary)
    np.testing.assert_array_equal(again, ids)


def test_training_on_a_text_over_the_limit(text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(picogpt.training.data, "TEXT_LIMIT", 1000)
    weights = tmp_path / "weights"
    plan = prepare(text_file, tmp_path / "m", small_options(), tokenizer=str(TINY),
                   weights_dir=weights)  # fmt: skip
    assert isinstance(plan.data[0], np.memmap)
    np.testing.assert_array_equal(np.concatenate(plan.data), tiny_ids())
    assert len(list((weights / "tokens").glob("*.bin"))) == 1
    shutil.rmtree(tmp_path / "m")
    status, _, err = run_train(capsys, text_file, "--out", tmp_path / "m", *SMALL)
    assert status == 2 and err.count("\n") == 1 and "--tokenizer gpt2" in err, err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(TEXT.encode() + b"caf\xe9" + TEXT.encode())
    status, _, err = run_train(capsys, bad, "--out", tmp_path / "m", "--tokenizer", TINY,
                               "--weights-dir", weights, *SMALL)  # fmt: skip
    assert status == 2 and f"is not UTF-8 text (byte offset {len(TEXT) + 3})" in err, err
    assert not list((weights / "tokens").glob("*.tmp*"))
