"""HuggingFace folders as model folders (read from files transformers wrote), `export` to either
layout against transformers, tokenizers and TensorFlow, and every bad folder against one clear
error."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import picogpt
from picogpt import cli
from picogpt.errors import ModelError, OutputExistsError, PicogptError
from picogpt.formats import safetensors
from picogpt.formats import tf_checkpoint as checkpoint
from picogpt.hub.export import export
from picogpt.hub.folder import read_folder
from picogpt.tokenizers.chars import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "gpt2-tiny"  # OpenAI's layout, written by TensorFlow
HF16 = FIXTURES / "gpt2-tiny-hf16"  # the same weights in float16, written by transformers
SHARDS = FIXTURES / "gpt2-tiny-hf-shards"  # float32, in three shards, written by transformers
CHAR = picogpt.BUNDLED / "shakespeare-char"
TEXT = "Hello there, how are you? Ünïcödé and 漢字 too.\n\n  Spaces   and\ttabs!"
CHAR_TEXT = "ROMEO:\nWhat light through yonder window breaks?\n\nJULIET:\nAy me!"


def tiny_params():
    with np.load(FIXTURES / "gpt2-tiny.npz") as npz:
        return dict(npz)


def relative_difference(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def transformers_logits(folder, ids):
    """GPT2LMHeadModel.from_pretrained(folder)'s logits, computed in float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def transformers_tokens(folder, text):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2TokenizerFast.from_pretrained(folder)(text)["input_ids"]


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --- reading what transformers wrote --------------------------------------------------------------

def test_shards_written_by_transformers_hold_gpt2_tiny():
    reference = picogpt.load(TINY)
    model = picogpt.load(SHARDS)
    assert model.hparams == reference.hparams
    ids = reference.encode(TEXT)
    assert model.encode(TEXT) == ids  # vocab.json + merges.txt: the same BPE
    assert np.array_equal(model.logits(ids), reference.logits(ids))
    assert len(list(SHARDS.glob("model-*.safetensors"))) == 3


def test_float16_folder_is_widened_exactly():
    hparams, tokenizer, params = read_folder(HF16)
    for name, value in tiny_params().items():
        assert params[name].dtype == np.float32, name
        assert np.array_equal(params[name], value.astype(np.float16).astype(np.float32)), name


def test_float16_folder_gives_transformers_logits():
    model = picogpt.load(HF16)
    ids = model.encode(TEXT)
    assert relative_difference(model.logits(ids), transformers_logits(HF16, ids)) < 1e-4


def test_tokenizer_json_is_the_same_bpe_as_encoder_json():
    assert (HF16 / "tokenizer.json").exists() and not (HF16 / "vocab.json").exists()
    model, reference = picogpt.load(HF16), picogpt.load(TINY)
    text = TEXT + " <|endoftext|> 's 're 999 ..."
    assert model.encode(text) == reference.encode(text)
    assert model.tokenizer.eot_id == reference.tokenizer.eot_id == 512


def test_names_without_the_transformer_prefix_and_ignored_buffers(tmp_path):
    folder = copy(HF16, tmp_path / "m")
    tensors = {name.removeprefix("transformer."): value
               for name, value in safetensors.read(folder / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old buffers
    tensors["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    tensors["lm_head.weight"] = tensors["wte.weight"]  # tied, and saved
    safetensors.write(folder / "model.safetensors", tensors, {"format": "pt"})
    ids = picogpt.load(HF16).encode(TEXT)
    assert np.array_equal(picogpt.load(folder).logits(ids), picogpt.load(HF16).logits(ids))


def test_hub_cache_snapshot_works_as_it_is(tmp_path):
    """The hub cache: snapshots/<rev>/ holds relative symlinks into blobs/."""
    repo = tmp_path / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(SHARDS.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    reference = picogpt.load(TINY)
    ids = reference.encode(TEXT)
    assert np.array_equal(picogpt.load(snapshot).logits(ids), reference.logits(ids))


class _Trap:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pytorch_pickle_is_never_unpickled(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(HF16 / "config.json", folder)
    shutil.copy(HF16 / "tokenizer.json", folder)
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ModelError, match="never unpickles") as e:
        picogpt.load(folder)
    assert "save_pretrained" in str(e.value) and "pytorch_model.bin" in str(e.value)
    assert not marker.exists()


def test_safetensors_beside_pytorch_and_flax_copies_are_used(tmp_path):
    folder = copy(HF16, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(tmp_path / "unpickled")))
    (folder / "flax_model.msgpack").write_bytes(b"\0")
    picogpt.load(folder)
    assert not (tmp_path / "unpickled").exists()


# --- bad folders: one clear error naming the file ------------------------------------------------

def hf_folder(tmp_path, config=None):
    folder = copy(HF16, tmp_path / "m")
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text)
    return folder


def config_with(**changes):
    config = json.loads((HF16 / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    return config


BAD_CONFIGS = [
    ("{not json", "config.json: config.json is not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ("[" * 100_000, "nested too deeply"),
    (config_with(model_type="llama"), "model_type is 'llama'"),
    (config_with(model_type=...), "model_type is None"),
    (config_with(n_embd=...), "no 'n_embd'"),
    (config_with(n_head=...), "no 'n_head'"),
    (config_with(n_layer=...), "no 'n_layer'"),
    (config_with(n_positions=...), "no 'n_positions'"),
    (config_with(vocab_size=...), "no 'vocab_size'"),
    (config_with(n_embd=32.0), "n_embd must be a positive integer"),
    (config_with(n_layer=0), "n_layer must be a positive integer"),
    (config_with(n_head=True), "n_head must be a positive integer"),
    (config_with(n_head=5), "not divisible"),
    (config_with(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (config_with(reorder_and_upcast_attn=True), "reorder_and_upcast_attn"),
    (config_with(activation_function="relu"), "activation_function 'relu'"),
    (config_with(scale_attn_weights=False), "scale_attn_weights"),
    (config_with(add_cross_attention=True), "cross-attention"),
    (config_with(tie_word_embeddings=False), "tie_word_embeddings"),
    (config_with(layer_norm_epsilon=1e-6), "layer_norm_epsilon 1e-06"),
    (config_with(n_inner=100), "n_inner 100"),
    (config_with(layer_norm_epsilon=10**400), "layer_norm_epsilon 1000"),
    (config_with(vocab_size=10**30), "wte.weight' is"),  # nothing sized by it is allocated
    (config_with(vocab_size=600), "model.safetensors: tensor 'transformer.wte.weight' is "
                                  r"\[513, 32\], but config.json's sizes make it \[600, 32\]"),
    (config_with(n_positions=128), "wpe.weight' is"),
    (config_with(n_layer=3), "no tensor 'transformer.h.2.ln_1.weight'"),
    (config_with(n_layer=1), "tensors that GPT-2 \\(1 layers\\) does not have"),
]


@pytest.mark.parametrize("config, message", BAD_CONFIGS, ids=[m[:40] for _, m in BAD_CONFIGS])
def test_bad_config(tmp_path, config, message):
    folder = hf_folder(tmp_path, config)
    with pytest.raises(ModelError, match=message) as e:
        picogpt.load(folder)
    assert str(folder) in str(e.value)


def test_gelu_pytorch_tanh_is_gpt2s_gelu(tmp_path):
    picogpt.load(hf_folder(tmp_path, config_with(activation_function="gelu_pytorch_tanh")))


def rewrite_weights(folder, change):
    tensors = dict(safetensors.read(folder / "model.safetensors"))
    change(tensors)
    safetensors.write(folder / "model.safetensors", tensors, {"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": np.zeros((32, 100), np.float16)}),
     r"tensor 'transformer.h.0.mlp.c_fc.weight' is \[32, 100\], but config.json's sizes make it "
     r"\[32, 128\]"),
    (lambda t: t.update({"transformer.h.0.ln_1.bias": np.zeros(32, np.int32)}),
     "is int32: GPT-2's weights are floating point"),
    (lambda t: t.pop("transformer.ln_f.bias"), "no tensor 'transformer.ln_f.bias'"),
    (lambda t: t.update({"score.weight": np.zeros(2, np.float16)}), "'score.weight'"),
    (lambda t: t.update({"lm_head.weight": np.zeros((513, 32), np.float16)}),
     "lm_head.weight differs from wte"),
    (lambda t: t.update({"h.0.ln_1.bias": t["transformer.h.0.ln_1.bias"]}), "there twice"),
])  # fmt: skip
def test_bad_weights(tmp_path, change, message):
    folder = hf_folder(tmp_path)
    rewrite_weights(folder, change)
    with pytest.raises(ModelError, match=message) as e:
        picogpt.load(folder)
    assert str(folder / "model.safetensors") in str(e.value)


def test_safetensors_cut_short_or_lying(tmp_path):
    folder = hf_folder(tmp_path)
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PicogptError, match="cut short") as e:
        picogpt.load(folder)
    assert str(path) in str(e.value)
    path.write_bytes((2**40).to_bytes(8, "little") + raw[8:])
    with pytest.raises(PicogptError, match="header length"):
        picogpt.load(folder)


def test_two_sets_of_weights(tmp_path):
    folder = hf_folder(tmp_path)
    for name in ("checkpoint", "model.ckpt.index", "model.ckpt.data-00000-of-00001"):
        shutil.copy(TINY / name, folder)
    with pytest.raises(ModelError, match="two sets of weights") as e:
        picogpt.load(folder)
    assert "model.ckpt.index" in str(e.value) and "model.safetensors" in str(e.value)
    openai = copy(TINY, tmp_path / "openai")  # OpenAI's folder with HF weights dropped in
    shutil.copy(HF16 / "model.safetensors", openai)
    with pytest.raises(ModelError, match="two sets of weights"):
        picogpt.load(openai)
    both = copy(SHARDS, tmp_path / "both")
    shutil.copy(HF16 / "model.safetensors", both)
    with pytest.raises(ModelError, match="model.safetensors and the shards"):
        picogpt.load(both)


def write_index(folder, change):
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    change(doc["weight_map"])
    index.write_text(json.dumps(doc))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update({"transformer.wte.weight": "../model-00001-of-00003.safetensors"}),
     "not a file name in this folder"),
    (lambda m: m.update({"transformer.wte.weight": "model-00002-of-00003.safetensors"}),
     "model-00002-of-00003.safetensors: has no tensor 'transformer.wte.weight'"),
    (lambda m: m.update({"transformer.h.1.ln_2.bias": "model-00001-of-00003.safetensors"}),
     "holds 'transformer.h.1.ln_2.bias', which model.safetensors.index.json places in "
     "model-00001"),
    (lambda m: m.update({"transformer.extra": "model-00002-of-00003.safetensors"}),
     "has no tensor 'transformer.extra'"),
    (lambda m: m.update({"transformer.extra": "model-00009-of-00003.safetensors"}),
     "does not exist"),
    (lambda m: m.clear(), "weight map is empty"),
])  # fmt: skip
def test_bad_index(tmp_path, change, message):
    folder = copy(SHARDS, tmp_path / "m")
    write_index(folder, change)
    with pytest.raises(PicogptError, match=message) as e:
        picogpt.load(folder)
    assert str(folder) in str(e.value)


def test_bad_tokenizer_json(tmp_path):
    folder = hf_folder(tmp_path)
    path = folder / "tokenizer.json"
    doc = json.loads(path.read_text())
    doc["pre_tokenizer"]["add_prefix_space"] = True
    path.write_text(json.dumps(doc))
    with pytest.raises(PicogptError, match="pre-tokenizer is not GPT-2's"):
        picogpt.load(folder)
    doc["pre_tokenizer"]["add_prefix_space"] = False
    doc["model"]["type"] = "WordPiece"
    path.write_text(json.dumps(doc))
    with pytest.raises(PicogptError, match="not a BPE tokenizer") as e:
        picogpt.load(folder)
    assert str(path) in str(e.value)
    doc["model"]["type"] = "BPE"
    doc["normalizer"] = {"type": "NFC"}
    path.write_text(json.dumps(doc))
    with pytest.raises(PicogptError, match="normalizer unlike GPT-2's"):
        picogpt.load(folder)
    path.unlink()
    with pytest.raises(ModelError, match="no tokenizer"):
        picogpt.load(folder)


# --- the command line ----------------------------------------------------------------------------

def picogpt_cmd(*args, tmp_path, input=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PICOGPT_WEIGHTS=str(tmp_path / "weights"),
               PICOGPT_BASE_URL="http://127.0.0.1:9", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "picogpt", *args], env=env, input=input,
                          capture_output=True, text=True, timeout=120, encoding="utf-8")


def test_cli_generate_chat_eval_with_an_hf_folder(tmp_path):
    out = picogpt_cmd("Hello", "--model", str(SHARDS), "--n", "5", "--seed", "1", "-t", "0",
                      tmp_path=tmp_path)
    reference = picogpt_cmd("Hello", "--model", str(TINY), "--n", "5", "--seed", "1", "-t", "0",
                            tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == reference.stdout and out.stdout.startswith("Hello")
    (tmp_path / "essay.txt").write_text(TEXT * 3)
    out = picogpt_cmd("eval", str(tmp_path / "essay.txt"), "--model", str(HF16), tmp_path=tmp_path)
    assert out.returncode == 0 and "perplexity" in out.stdout, out.stderr
    out = picogpt_cmd("chat", "--model", str(HF16), "--n", "4", "--seed", "1",
                      tmp_path=tmp_path, input="Hi!\n")
    assert out.returncode == 0 and "you> Hi!" in out.stdout, out.stderr


def test_cli_bad_hf_folder_is_one_line_and_exit_1(tmp_path):
    folder = hf_folder(tmp_path, config_with(n_layer=...))
    out = picogpt_cmd("Hello", "--model", str(folder), tmp_path=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.count("\n") == 1 and str(folder / "config.json") in out.stderr
    path = hf_folder(tmp_path / "2") / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    out = picogpt_cmd("eval", __file__, "--model", str(path.parent), tmp_path=tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr and str(path) in out.stderr


# --- export --------------------------------------------------------------------------------------

def test_export_tf_model_to_hf_loads_in_transformers(tmp_path):
    out = export(TINY, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors",
        "tokenizer_config.json", "vocab.json"]  # fmt: skip
    model = picogpt.load(TINY)
    ids = model.encode(TEXT)
    assert relative_difference(transformers_logits(out, ids), model.logits(ids)) < 1e-4
    assert transformers_tokens(out, TEXT) == ids
    assert np.array_equal(picogpt.load(out).logits(ids), model.logits(ids))
    assert (out / "merges.txt").read_text() == (TINY / "vocab.bpe").read_text()
    assert json.loads((out / "vocab.json").read_text()) == json.loads(
        (TINY / "encoder.json").read_text())


def test_export_char_model_to_hf(tmp_path):
    out = export(CHAR, tmp_path / "out")
    model = picogpt.load(CHAR)
    ids = model.encode(CHAR_TEXT)
    assert relative_difference(transformers_logits(out, ids), model.logits(ids)) < 1e-4
    assert transformers_tokens(out, CHAR_TEXT) == ids
    again = picogpt.load(out)
    assert isinstance(again.tokenizer, CharTokenizer)
    assert np.array_equal(again.logits(ids), model.logits(ids))
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] is None and config["vocab_size"] == 65


def test_export_float16_hf_folder(tmp_path):
    model = picogpt.load(HF16)
    ids = model.encode(TEXT)
    for dtype in ("float16", "float32"):
        out = export(HF16, tmp_path / dtype, dtype=dtype)
        header = safetensors.read_header(out / "model.safetensors")[1]
        assert {e.dtype for e in header.values()} == {"F16" if dtype == "float16" else "F32"}
        assert relative_difference(transformers_logits(out, ids), model.logits(ids)) < 1e-4
        assert transformers_tokens(out, TEXT) == ids
        halves, written = read_folder(HF16)[2], read_folder(out)[2]
        for name, value in halves.items():  # float32 widens each half exactly
            assert np.array_equal(np.asarray(written[name], np.float32),
                                  np.asarray(value, np.float32)), name  # fmt: skip
        # The same weights; float32's products run in another order (engine.streaming_copy).
        assert relative_difference(picogpt.load(out).logits(ids), model.logits(ids)) < 1e-6


def test_export_openai_layout_tensorflow_reads(tmp_path):
    tf = pytest.importorskip("tensorflow")
    out = export(HF16, tmp_path / "out", format="openai")
    assert {"hparams.json", "checkpoint", "encoder.json", "vocab.bpe",
            "model.ckpt.index"} <= {p.name for p in out.iterdir()}  # fmt: skip
    reader = tf.train.load_checkpoint(str(out / "model.ckpt"))
    params = read_folder(HF16)[2]
    assert sorted(reader.get_variable_to_shape_map()) == sorted(params)
    for name, value in params.items():
        assert np.array_equal(reader.get_tensor(name), value), name
    model = picogpt.load(HF16)
    ids = model.encode(TEXT)
    # The same weights (above); float32's products run in another order (streaming_copy).
    assert relative_difference(picogpt.load(out).logits(ids), model.logits(ids)) < 1e-6
    assert (out / "vocab.bpe").read_text() == (TINY / "vocab.bpe").read_text()


def test_export_char_model_to_openai_layout(tmp_path):
    out = export(CHAR, tmp_path / "out", format="openai")
    model = picogpt.load(CHAR)
    ids = model.encode(CHAR_TEXT)
    assert np.array_equal(picogpt.load(out).logits(ids), model.logits(ids))
    assert (out / "chars.json").exists()


def test_export_never_overwrites(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("my notes")
    with pytest.raises(OutputExistsError, match="never overwrites"):
        export(TINY, out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError):
        export(TINY, tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    export(TINY, empty)  # an empty folder is fine
    assert (empty / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "out"]  # no temporary


def test_export_where_no_folder_can_be_made_names_the_folder_asked_for(tmp_path):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "model"  # its parent is a file
    with pytest.raises(PicogptError) as e:
        export(TINY, out)
    assert str(e.value).startswith(f"cannot write {out}: ") and ".tmp" not in str(e.value)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_export_a_bad_model_leaves_nothing(tmp_path):
    bad = hf_folder(tmp_path, config_with(n_layer=3))
    with pytest.raises(ModelError):
        export(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_float16_export_refuses_values_it_cannot_hold(tmp_path):
    folder = copy(TINY, tmp_path / "big")
    params = tiny_params()
    params["model/wte"][3, 4] = 1e6
    checkpoint.write(folder / "model.ckpt", params)
    with pytest.raises(ModelError, match="beyond float16's range"):
        export(folder, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()


def test_cli_export(tmp_path, capsys):
    out = picogpt_cmd("export", str(TINY), str(tmp_path / "out"), "--dtype", "float16",
                      tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "written to" in out.stderr and (tmp_path / "out" / "model.safetensors").exists()
    for args, message in [
        ([str(TINY), str(tmp_path / "out")], "never overwrites"),
        ([str(TINY), str(tmp_path / "o2"), "--format", "openai", "--dtype", "float16"], "float32"),
        ([str(tmp_path / "nothing"), str(tmp_path / "o3")], "no model"),
        ([str(TINY), str(tmp_path / "o4"), "--format", "onnx"], "invalid choice"),
    ]:  # bad arguments: exit 2, one line
        capsys.readouterr()
        try:
            status = cli.main(["export", *args])
        except SystemExit as e:  # argparse's own errors
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and message in err and err.count("\n") == 1, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def dead_pid():
    """The pid of a process that has ended and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", ""])
    p.wait(timeout=60)
    return p.pid


def test_a_killed_export_s_leftover_goes_with_the_next_export(tmp_path):
    """SIGKILL while the folder is written leaves OUT.tmp<pid>; the next export to OUT deletes
    it, and writes OUT."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PICOGPT_WEIGHTS=str(tmp_path / "weights"))
    for _ in range(5):  # the folder is written in tens of milliseconds: catch it in the act
        p = subprocess.Popen([sys.executable, "-m", "picogpt", "export", str(CHAR), str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp = tmp_path / f"out.tmp{p.pid}"
        deadline = time.monotonic() + 60
        while not tmp.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
        p.kill()
        p.wait(timeout=60)
        if tmp.exists():
            break
        shutil.rmtree(out, ignore_errors=True)  # it finished first: once more
    assert tmp.exists(), "no export was caught while writing its folder"
    assert not out.exists()
    again = picogpt_cmd("export", str(CHAR), str(out), tmp_path=tmp_path)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert picogpt.load(out).hparams == picogpt.load(CHAR).hparams


def test_export_deletes_only_leftovers_of_its_own(tmp_path):
    dead = [dead_pid() for _ in range(4)]

    def leftover(name, mark=True, files=("config.json",)):
        folder = tmp_path / name
        folder.mkdir()
        if mark:
            (folder / ".picogpt-export").touch()
        for f in files:
            (folder / f).write_text("x")
        return name

    gone = [leftover(f"out.tmp{dead[0]}", files=("config.json", f"vocab.json.tmp{dead[0]}")),
            leftover(f"out.tmp{dead[1]}", mark=False, files=()),  # killed before its mark
            leftover(f"out.tmp{os.getpid()}")]  # an earlier process that had our pid
    kept = [leftover(f"out.tmp{os.getppid()}"),  # an export still running
            leftover(f"out.tmp{dead[2]}", mark=False),  # not export's: it has no mark
            leftover(f"other.tmp{dead[0]}"),  # another folder's
            leftover("out.tmp12ab"), leftover("out.tmp99999999999999999999999")]
    (tmp_path / f"out.tmp{dead[3]}").write_text("a file, not a folder export writes")
    kept.append(f"out.tmp{dead[3]}")
    export(TINY, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["out"])
    assert all(not (tmp_path / name).exists() for name in gone)
    assert not (tmp_path / "out" / ".picogpt-export").exists()


# --- a character vocabulary as GPT-2's byte-level BPE --------------------------------------------

CHARS = sorted("\n !?abcxyzé€😀ÿ漢字")  # one to four UTF-8 bytes each


def char_model(folder, chars, seed=0):
    """A random one-layer character model in OpenAI's layout."""
    rng = np.random.default_rng(seed)
    hparams = {"n_vocab": len(chars), "n_ctx": 32, "n_embd": 8, "n_head": 2, "n_layer": 1}
    params = {name: (rng.standard_normal(shape) * 0.5).astype(np.float32)
              for name, shape in picogpt.gpt2.params.param_shapes(hparams).items()}
    folder.mkdir()
    (folder / "hparams.json").write_text(json.dumps(hparams))
    checkpoint.write(folder / "model.ckpt", params)
    CharTokenizer(chars).save(folder)
    return folder


@pytest.fixture(scope="module")
def unicode_char_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("chars")
    folder = char_model(root / "model", CHARS)
    return folder, export(folder, root / "hf")


def test_multibyte_char_model_export_loads_in_transformers(unicode_char_export):
    folder, out = unicode_char_export
    model = picogpt.load(folder)
    text = "abc 漢字 é€😀!\n\nÿ?"
    ids = model.encode(text)
    assert transformers_tokens(out, text) == ids
    assert relative_difference(transformers_logits(out, ids), model.logits(ids)) < 1e-4


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(text=st.text(alphabet=CHARS, max_size=40))
def test_char_bpe_cuts_any_text_into_its_characters(unicode_char_export, text):
    transformers = pytest.importorskip("transformers")
    _, out = unicode_char_export
    tokenizer = _cached_tokenizer(transformers, out)
    assert tokenizer(text)["input_ids"] == CharTokenizer(CHARS).encode(text)
    assert tokenizer.decode(CharTokenizer(CHARS).encode(text)) == text


_TOKENIZERS = {}


def _cached_tokenizer(transformers, folder):
    if folder not in _TOKENIZERS:
        _TOKENIZERS[folder] = transformers.GPT2TokenizerFast.from_pretrained(folder)
    return _TOKENIZERS[folder]


def test_cli_train_init_from_an_hf_folder(tmp_path):
    (tmp_path / "text.txt").write_text("Hello there, how are you? I am fine, thank you. " * 100)
    out = picogpt_cmd("train", str(tmp_path / "text.txt"), "--out", str(tmp_path / "ft"),
                      "--init", str(HF16), "--max-iters", "1", "--block-size", "16",
                      "--batch-size", "2", "--eval-iters", "1", tmp_path=tmp_path)
    assert out.returncode == 0, out.stderr
    tuned = picogpt.load(tmp_path / "ft")
    assert tuned.hparams == picogpt.load(HF16).hparams
    assert tuned.encode(TEXT) == picogpt.load(HF16).encode(TEXT)


def test_export_of_a_folder_missing_a_tokenizer_file(tmp_path):
    folder = copy(SHARDS, tmp_path / "m")
    (folder / "merges.txt").unlink()
    with pytest.raises(ModelError, match="merges.txt") as e:
        export(folder, tmp_path / "out")
    assert str(folder) in str(e.value) and not (tmp_path / "out").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_hf_folder_files(tmp_path_factory, data):
    """Byte flips and truncations in any of an HF folder's files: it loads (a flip that changes
    nothing checked, a weight's value) or it is a PicogptError, never anything else."""
    folder = copy(HF16, tmp_path_factory.mktemp("fuzz") / "m")
    name = data.draw(st.sampled_from(["config.json", "tokenizer.json", "model.safetensors"]))
    path = folder / name
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    limit = len(raw) if name != "model.safetensors" else min(len(raw), 4096)  # the header
    for _ in range(data.draw(st.integers(1, 3), label="flips")):
        if limit:
            raw[data.draw(st.integers(0, limit - 1), label="at")] = data.draw(
                st.integers(0, 255), label="byte")
    path.write_bytes(bytes(raw))
    try:
        picogpt.load(folder)
    except PicogptError:
        pass
