"""Weights kept in float16, bfloat16 or int8 and widened inside the products: the widening is
exact where it can be (every float16, bfloat16 as PyTorch rounds it), int8 is within half a
block's scale, products equal those of the widened weights, and the bundled model keeps its
perplexity and its predictions on held-out text."""

import json
from pathlib import Path

import numpy as np
import pytest

import picogpt
from picogpt.formats import tf_checkpoint as checkpoint
from picogpt.gpt2 import compact, engine, parallel
from picogpt.tokenizers.chars import CharTokenizer

FOLDER = picogpt.BUNDLED / "shakespeare-char"
HELD_OUT = Path(__file__).parent / "fixtures" / "held_out.txt"  # Tiny Shakespeare's last lines


def test_every_half_widens_exactly_and_every_non_finite_one_stays_so():
    """Every finite half widens to its float32 (-0.0 and subnormals too); infinities and NaNs
    widen to infinities, so that the logits check catches a damaged weight as in float32."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    halves = bits.view(np.float16)
    finite = np.isfinite(halves)
    out = compact.Float16(bits[None]).widen(np.empty((1, len(bits)), np.float32))[0]
    expected = halves.astype(np.float32)
    np.testing.assert_array_equal(out[finite].view(np.uint32), expected[finite].view(np.uint32))
    infinite = np.isinf(halves)
    assert np.isinf(out[~finite]).all() and (out[infinite] == expected[infinite]).all()
    # Decoding's product (Float16.product) the same: each such half alone in a row of zeros.
    w = compact.Float16(np.diag(bits[~finite]))  # [2048, 2048]
    got = compact.matmul(np.ones((1, len(w)), np.float32), w, np.empty((1, len(w)), np.float32))
    assert not np.isfinite(got).any()


def test_bfloat16_rounds_to_nearest_even_as_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.standard_normal((8, 64)).astype(np.float32),
                        # ties: the lower 16 bits exactly 0x8000, with even and odd upper halves
                        np.array([[0x3F808000, 0x3F818000, 0xBF808000, 0x00008000] * 16],
                                 np.uint32).view(np.float32)])  # fmt: skip
    ours = compact.compress(w, "bfloat16")
    theirs = torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours.data, theirs)
    out = ours.widen(np.empty(w.shape, np.float32))
    np.testing.assert_array_equal(out, torch.from_numpy(w).to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("n_in", [176, 64, 7])
def test_int8_is_within_half_a_block_scale(n_in):
    """Rows of 176 end in a shorter block of 16 with a scale of its own."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, n_in)).astype(np.float32)
    w[3, -1] = 50.0  # a large value in the last (short) block only
    q = compact.compress(w, "int8")
    assert q.scales.shape == (40, -(-n_in // compact.QBLOCK))
    out = q.widen(np.empty(w.shape, np.float32))
    per_value = np.repeat(q.scales, compact.QBLOCK, axis=1)[:, :n_in]
    assert np.all(np.abs(out - w) <= per_value / 2 * (1 + 1e-6))
    others = (n_in - 1) // compact.QBLOCK * compact.QBLOCK  # the blocks before the large value's
    assert np.abs(out[3, :others] - w[3, :others]).max(initial=0) < 0.05


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("n_in", [176, 64, 7])  # int8's last block shorter, or not
def test_products_are_those_of_the_widened_weights(dtype, n_in, monkeypatch):
    """Several widening bands a product, rows in and out of a band, 1 row (decoding's product)
    and many."""
    monkeypatch.setattr(compact, "WIDEN_BYTES", 7 * n_in * 4)  # 7 rows a band
    rng = np.random.default_rng(2)
    w = compact.compress(rng.standard_normal((50, n_in)).astype(np.float32), dtype)
    widened = w.widen(np.empty(w.shape, np.float32))
    for rows in (1, 3, 20):
        x = rng.standard_normal((rows, n_in)).astype(np.float32)
        got = compact.matmul(x, w, np.empty((rows, 50), np.float32))
        np.testing.assert_allclose(got, x @ widened.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(w[10:20].widen(np.empty((10, n_in), np.float32)),
                                  widened[10:20])  # fmt: skip
    ids = np.array([[4, 0], [49, 4]])
    np.testing.assert_array_equal(w.take(ids), widened[ids])


def bundled_logits(dtype, ids, n_ctx):
    """Teacher-forced logits of the bundled model, in windows of n_ctx, with `dtype` weights."""
    hparams = json.loads((FOLDER / "hparams.json").read_text())
    gpt = engine.GPT(checkpoint.read(FOLDER), hparams, dtype=dtype)
    windows = ids[: len(ids) // (n_ctx + 1) * (n_ctx + 1)].reshape(-1, n_ctx + 1)
    logits = gpt.forward(windows[:, :-1], gpt.new_cache(len(windows)), all_logits=True)
    return logits.astype(np.float64), windows[:, 1:]


def perplexity(logits, targets):
    logits = logits - logits.max(axis=-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(logp, targets[..., None], axis=-1).mean()))


@pytest.mark.parametrize("dtype, ppl_within, agreement", [
    ("float16", 1e-3, 0.99), ("bfloat16", 1e-3, 0.99), ("int8", 1e-2, 0.95)])
def test_the_bundled_model_keeps_its_perplexity_and_its_predictions(dtype, ppl_within, agreement):
    """On held-out text (the end of Tiny Shakespeare, ~3,800 characters): perplexity within
    0.1% (float16, bfloat16) or 1% (int8) of float32's, and the next character's argmax the
    same as float32's at >= 99% (95% for int8) of positions. At 1 thread and at 3."""
    tokenizer = CharTokenizer.load(FOLDER)
    ids = np.array(tokenizer.encode(HELD_OUT.read_text(encoding="utf-8")))
    reference, targets = bundled_logits("float32", ids, 127)
    before = parallel.set_threads(1)
    try:
        for threads in (1, 3):
            parallel.set_threads(threads)
            logits, _ = bundled_logits(dtype, ids, 127)
            ratio = perplexity(logits, targets) / perplexity(reference, targets)
            assert abs(ratio - 1) <= ppl_within, ratio
            same = (logits.argmax(-1) == reference.argmax(-1)).mean()
            assert same >= agreement, same
    finally:
        parallel.set_threads(before)


def test_an_unknown_dtype_is_refused():
    hparams = json.loads((FOLDER / "hparams.json").read_text())
    with pytest.raises(ValueError, match="one of float32, float16, bfloat16, int8"):
        engine.GPT(checkpoint.read(FOLDER), hparams, dtype="float8")


@pytest.mark.parametrize("given", [np.dtype("float16"), np.float16])
def test_a_numpy_dtype_is_taken_by_its_name(given):
    by_name = picogpt.load(FOLDER, dtype="float16")
    m = picogpt.load(FOLDER, dtype=given)
    assert m.gpt.dtype == "float16"
    assert np.array_equal(m.logits([5, 6, 7]), by_name.logits([5, 6, 7]))


@pytest.mark.parametrize("given", [np.dtype("float64"), np.float64, 16, b"int8"])
def test_a_dtype_that_is_none_of_ours_is_a_value_error(given):
    with pytest.raises(ValueError, match="one of float32, float16, bfloat16, int8"):
        picogpt.load(FOLDER, dtype=given)


HF16 = Path(__file__).parent / "fixtures" / "gpt2-tiny-hf16"  # float16, written by transformers


def test_the_command_lines_dtypes_are_the_engines():
    from picogpt.cli.arguments import DTYPES

    assert DTYPES == compact.DTYPES


def test_a_float16_folder_runs_in_float16_unless_told():
    """HuggingFace's float16 weights stay float16 (mapped, not widened whole) by default, and give
    the logits of the same weights widened at load (--dtype float32)."""
    halves, widened = picogpt.load(HF16), picogpt.load(HF16, dtype="float32")
    assert halves.gpt.dtype == "float16" and widened.gpt.dtype == "float32"
    assert isinstance(halves.gpt.blocks[0]["c_fc"][0], compact.Float16)
    assert isinstance(halves.gpt.wte, compact.Float16)
    ids = halves.encode("Hello, world. " * 3)
    a, b = halves.logits(ids), widened.logits(ids)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_bfloat16_export_runs_as_bfloat16_and_transformers_reads_it(tmp_path):
    """export --dtype bfloat16 writes BF16 safetensors, which load keeps as bfloat16, and which
    transformers reads to the same logits."""
    from picogpt.hub.export import export

    out = export(HF16, tmp_path / "bf16", dtype="bfloat16")
    model = picogpt.load(out)
    assert model.gpt.dtype == "bfloat16"
    assert isinstance(model.gpt.blocks[1]["c_attn"][0], compact.BFloat16)
    ids = model.encode("Hello, world. " * 3)
    ours = model.logits(ids)
    reference = picogpt.load(out, dtype="float32").logits(ids)  # the same values, widened
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


@pytest.mark.parametrize("folder_dtype", ["float16", "bfloat16"])
def test_a_16_bit_folder_runs_in_every_dtype(folder_dtype, tmp_path):
    """A float16 or bfloat16 folder loads in each dtype (bfloat16 to int8 once failed on the
    token embedding) and gives the logits of its weights widened, within the dtype's rounding."""
    from picogpt.hub.export import export

    folder = HF16 if folder_dtype == "float16" else export(HF16, tmp_path / "bf16",
                                                           dtype="bfloat16")
    reference = picogpt.load(folder, dtype="float32")
    ids = reference.encode("Hello, world. " * 3)
    expected = reference.logits(ids)
    for dtype, within in [("float16", 1e-2), ("bfloat16", 2e-2), ("int8", 5e-2)]:
        model = picogpt.load(folder, dtype=dtype)
        assert model.gpt.dtype == dtype and compact.dtype_of(model.gpt.wte) == dtype
        assert np.abs(model.logits(ids) - expected).max() <= within * np.abs(expected).max()


def test_a_dtype_the_weights_cannot_take_says_why(tmp_path):
    from picogpt.formats import safetensors
    from picogpt.hub.export import export

    out = export(HF16, tmp_path / "big", dtype="float32")  # a float32 copy, then a value too large
    data = (out / "model.safetensors").read_bytes()
    tensors = dict(safetensors.read(out / "model.safetensors"))
    big = np.array(tensors["transformer.h.0.mlp.c_fc.weight"])
    big[0, 0] = 1e6
    tensors["transformer.h.0.mlp.c_fc.weight"] = big
    (out / "model.safetensors").unlink()
    safetensors.write(out / "model.safetensors", tensors, metadata={"format": "pt"})
    assert data != (out / "model.safetensors").read_bytes()
    with pytest.raises(picogpt.ModelError, match="c_fc/w.*beyond float16's range.*bfloat16"):
        picogpt.load(out, dtype="float16")
    assert picogpt.load(out, dtype="bfloat16").gpt.dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype 'float8'"):
        picogpt.load(out, dtype="float8")
