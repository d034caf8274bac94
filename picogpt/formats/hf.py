"""HuggingFace's layout of a model folder: reading it, and writing one (hub/export.py writes any
model in either layout).

An HF folder (what `save_pretrained` writes, what the hub serves, what its cache holds) has:
- `config.json`: GPT2Config, model_type "gpt2";
- `model.safetensors`, or shards listed in `model.safetensors.index.json` (never
  `pytorch_model.bin`: a pickle can run code, so it is never unpickled);
- a tokenizer: `vocab.json` + `merges.txt` (the same files as OpenAI's `encoder.json` +
  `vocab.bpe`), or `tokenizer.json` (whose model section holds the same vocabulary and merges);
  picogpt's own `chars.json` for the character models it trains, when present, comes first.

HF's tensor names map to OpenAI's in one table, `hf_names`. Both store matrices in Conv1D's
[n_in, n_out] order; OpenAI's have a leading 1 ([1, n_in, n_out]), a free reshape.
"""

import re
from pathlib import Path

import numpy as np

from picogpt import files
from picogpt.errors import ModelError, VocabularyError
from picogpt.formats import safetensors
from picogpt.gpt2 import compact
from picogpt.gpt2.kernels import LN_EPS
from picogpt.gpt2.params import is_matrix, param_shapes
from picogpt.tokenizers.chars import CharTokenizer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
CHARS = "chars.json"
BPE_FILES = ("vocab.json", "merges.txt")
TOKENIZER = "tokenizer.json"

CONFIG_LIMIT = files.MB
INDEX_LIMIT = 16 * files.MB  # a weight map: a line per tensor
TOKENIZER_LIMIT = 64 * files.MB  # GPT-2's is 1.4 MB

# A block's tensors, OpenAI's name -> HuggingFace's: the one table of the two names.
BLOCK_NAMES = {
    "ln_1/g": "ln_1.weight", "ln_1/b": "ln_1.bias",
    "attn/c_attn/w": "attn.c_attn.weight", "attn/c_attn/b": "attn.c_attn.bias",
    "attn/c_proj/w": "attn.c_proj.weight", "attn/c_proj/b": "attn.c_proj.bias",
    "ln_2/g": "ln_2.weight", "ln_2/b": "ln_2.bias",
    "mlp/c_fc/w": "mlp.c_fc.weight", "mlp/c_fc/b": "mlp.c_fc.bias",
    "mlp/c_proj/w": "mlp.c_proj.weight", "mlp/c_proj/b": "mlp.c_proj.bias",
}  # fmt: skip
TOP_NAMES = {"model/wte": "wte.weight", "model/wpe": "wpe.weight",
             "model/ln_f/g": "ln_f.weight", "model/ln_f/b": "ln_f.bias"}  # fmt: skip
PREFIX = "transformer."  # GPT2LMHeadModel's names; GPT2Model's have none
LM_HEAD = "lm_head.weight"  # the output projection: GPT-2 ties it to wte
BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers older versions saved
_LAYER = re.compile(r"(?:transformer\.)?h\.(\d+)\.")  # a block's tensor: its layer number


def hf_names(n_layer, prefix=PREFIX):
    """OpenAI's name -> HuggingFace's for every tensor of an n_layer GPT-2 (GPT2LMHeadModel's
    names with the default prefix)."""
    names = {ours: prefix + theirs for ours, theirs in TOP_NAMES.items()}
    for i in range(n_layer):
        for ours, theirs in BLOCK_NAMES.items():
            names[f"model/h{i}/{ours}"] = f"{prefix}h.{i}.{theirs}"
    return names


def to_hf(params, n_layer):
    """OpenAI-named params -> GPT2LMHeadModel's state dict (NumPy views, [1, n, m] -> [n, m])."""
    return {hf: _squeeze(params[ours]) for ours, hf in hf_names(n_layer).items()}


def _squeeze(array):
    return array[0] if array.ndim == 3 else array


# ---------------------------------------------------------------------------------------------
# Which layout
# ---------------------------------------------------------------------------------------------


def is_hf_folder(folder):
    """True for a folder in HuggingFace's layout: it has HF weights (even next to OpenAI's
    files: reading it then names both sets), or a config.json and no hparams.json."""
    folder = Path(folder)
    if any((folder / name).exists() for name in (WEIGHTS, INDEX, *PICKLES)):
        return True
    return (folder / CONFIG).exists() and not (folder / "hparams.json").exists()


def _tf_files(folder):
    return sorted(p.name for p in folder.glob("*.index")) + (
        ["checkpoint"] if (folder / "checkpoint").is_file() else [])


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

# GPT2Config's options that change what the network computes: the value (or values) the engine
# computes, and what other values would mean. Absent keys take GPT2Config's defaults, which are
# GPT-2's.
SUPPORTED = {
    "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "another activation than GPT-2's "
                            "tanh GELU"),
    "scale_attn_weights": ((True,), "attention scores not scaled by 1/sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": ((False,), "attention scaled by 1/(layer + 1)"),
    "reorder_and_upcast_attn": ((False,), "keys scaled before the product, upcast for "
                                "mixed-precision training"),
    "add_cross_attention": ((False,), "cross-attention to an encoder"),
    "tie_word_embeddings": ((True,), "an output projection separate from wte"),
}

def read_config(folder):
    """The hparams (n_vocab, n_ctx, n_embd, n_head, n_layer) of an HF folder's config.json, after
    refusing anything GPT-2's engine does not compute."""
    path = Path(folder) / CONFIG
    if not path.exists():
        raise ModelError(f"{folder}: no {CONFIG}: not a HuggingFace model folder")
    config = files.load_json(path, CONFIG_LIMIT, CONFIG, error=ModelError)
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object")
    if config.get("model_type") != "gpt2":
        raise ModelError(f"{path}: model_type is {config.get('model_type')!r}; picogpt runs "
                         "GPT-2 (model_type \"gpt2\")")
    hparams = {}
    for ours, theirs in (("n_vocab", "vocab_size"), ("n_ctx", "n_positions"),
                         ("n_embd", "n_embd"), ("n_head", "n_head"), ("n_layer", "n_layer")):
        if theirs not in config:
            raise ModelError(f"{path}: no {theirs!r}")
        value = config[theirs]
        if type(value) is not int or value <= 0:
            raise ModelError(f"{path}: {theirs} must be a positive integer, got {value!r}")
        hparams[ours] = value
    if hparams["n_embd"] % hparams["n_head"]:
        raise ModelError(f"{path}: n_embd {hparams['n_embd']} is not divisible by n_head "
                         f"{hparams['n_head']}")
    for key, (values, meaning) in SUPPORTED.items():
        if key in config and config[key] not in values:
            raise ModelError(f"{path}: {key} {config[key]!r} ({meaning}) is not GPT-2's network, "
                             "and picogpt's engine does not compute it")
    eps = config.get("layer_norm_epsilon", LN_EPS)
    if type(eps) is not float or abs(eps - LN_EPS) > 1e-12:  # (a JSON integer is never 1e-5)
        raise ModelError(f"{path}: layer_norm_epsilon {eps!r}: picogpt's engine uses GPT-2's "
                         f"{LN_EPS}")
    n_inner = config.get("n_inner")
    if n_inner is not None and n_inner != 4 * hparams["n_embd"]:
        raise ModelError(f"{path}: n_inner {n_inner!r}: GPT-2's MLP is 4 x n_embd wide "
                         f"({4 * hparams['n_embd']})")
    return hparams


def read_folder(folder, compact_matrices=False):
    """(hparams, tokenizer, params) of an HF folder: params float32 in OpenAI's names and shapes,
    as the engine, training and export take them; with compact_matrices, the weight matrices
    (params.is_matrix) in float16 or bfloat16 stay so, mapped, for the engine."""
    folder = Path(folder)
    weights = weight_files(folder)  # first: which weights, if any, is the first question
    hparams = read_config(folder)
    tokenizer = read_tokenizer(folder)
    return hparams, tokenizer, read_params(folder, hparams, weights, compact_matrices)


def weight_files(folder):
    """(paths, weight_map): the safetensors files holding an HF folder's weights, and the index's
    {tensor name: file name} (None for one model.safetensors). Any other set of weights beside
    them (or instead of them) is an error naming both."""
    folder = Path(folder)
    found = [name for name in (WEIGHTS, INDEX) if (folder / name).exists()]
    tf = _tf_files(folder)
    if found and tf:
        raise ModelError(f"{folder}: two sets of weights, a TensorFlow checkpoint "
                         f"({', '.join(tf)}) and safetensors ({', '.join(found)}): move one away")
    if len(found) == 2:
        raise ModelError(f"{folder}: two sets of weights, {WEIGHTS} and the shards of {INDEX}: "
                         "move one away")
    if not found:
        pickles = [name for name in PICKLES if (folder / name).exists()]
        if pickles:
            raise ModelError(
                f"{folder}: the weights are {pickles[0]}, a PyTorch pickle, which picogpt never "
                "unpickles (loading a pickle can run any code). Convert it to safetensors "
                "with transformers, once, if you trust the file: python -c \"from transformers "
                f"import GPT2LMHeadModel as M; M.from_pretrained('{folder}')"
                f".save_pretrained('{folder}')\"")
        if tf:
            raise ModelError(f"{folder}: has {CONFIG} and a TensorFlow checkpoint but no "
                             "hparams.json: OpenAI's layout needs hparams.json, HuggingFace's "
                             f"{WEIGHTS}")
        raise ModelError(f"{folder}: no weights ({WEIGHTS}, or shards and {INDEX})")
    if found == [WEIGHTS]:
        return [folder / WEIGHTS], None
    weight_map = _weight_map(folder / INDEX)
    return [folder / name for name in sorted(set(weight_map.values()))], weight_map


def _weight_map(index):
    """An index's weight_map, each shard checked to be a plain file name in the folder."""
    doc = files.load_json(index, INDEX_LIMIT, INDEX, error=ModelError)
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ModelError(f"{index}: expected {{\"weight_map\": {{tensor name: file name}}}}")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise ModelError(f"{index}: {name!r} is not a file name in this folder")
    if not shards:
        raise ModelError(f"{index}: the weight map is empty")
    return weight_map


def read_tensors(folder, weights=None, bfloat16="float32"):
    """{HF name: array} of an HF folder's weights, and {HF name: the file holding it}.
    `weights` is what weight_files(folder) says, when already asked; `bfloat16` as
    safetensors.read takes it."""
    paths, weight_map = weights or weight_files(folder)
    tensors, where = {}, {}
    for path in paths:
        for name, array in safetensors.read(path, bfloat16).items():
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ModelError(f"{path}: holds {name!r}, which {INDEX} places in "
                                 f"{weight_map.get(name) or 'no file'}")
            tensors[name], where[name] = array, path
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors:
                raise ModelError(f"{Path(folder) / shard}: has no tensor {name!r}, which "
                                 f"{INDEX} places there")
    return tensors, where


def read_params(folder, hparams, weights=None, compact_matrices=False):
    """An HF folder's weights as the engine takes them: OpenAI's names and shapes, float32 (with
    compact_matrices, the weight matrices' float16 or bfloat16 as they are); each tensor checked
    against the shape config.json's sizes give it."""
    tensors, where = read_tensors(folder, weights, "raw" if compact_matrices else "float32")
    if hparams["n_layer"] > len(tensors):  # before any table n_layer long is built
        layers = {m.group(1) for m in map(_LAYER.match, tensors) if m}
        raise ModelError(f"{Path(folder) / CONFIG}: n_layer is {hparams['n_layer']} but the "
                         f"weights are those of {len(layers)} layer(s)")
    by_hf = {hf: ours for ours, hf in hf_names(hparams["n_layer"], prefix="").items()}
    shapes = param_shapes(hparams)
    params, lm_head, unknown = {}, None, []
    for name, array in tensors.items():
        short = name[len(PREFIX):] if name.startswith(PREFIX) else name
        if name == LM_HEAD:
            lm_head = name
        elif short in by_hf:
            ours = by_hf[short]
            if ours in params:
                raise ModelError(f"{where[name]}: {short!r} is there twice, with and without "
                                 f"{PREFIX!r}")
            keep = compact_matrices and is_matrix(ours)
            params[ours] = _engine_array(name, array, shapes[ours], where[name], keep)
        elif not short.endswith(BUFFERS):
            unknown.append(name)
    if unknown:
        shown = ", ".join(map(repr, sorted(unknown)[:5]))
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise ModelError(f"{where[unknown[0]]}: tensors that GPT-2 ({hparams['n_layer']} layers) "
                         f"does not have: {shown}{more}")
    for ours, hf in hf_names(hparams["n_layer"]).items():
        if ours not in params:
            paths = sorted(set(where.values()))
            if len(paths) == 1:
                raise ModelError(f"{paths[0]}: no tensor {hf!r}")
            shards = ", ".join(p.name for p in paths) or "none"
            raise ModelError(f"{folder}: no tensor {hf!r} in its shards ({shards})")
    if lm_head is not None:
        head = _engine_array(lm_head, tensors[lm_head], shapes["model/wte"], where[lm_head],
                             compact_matrices)  # fmt: skip
        if not _same(head, params["model/wte"]):
            raise ModelError(f"{where[lm_head]}: {LM_HEAD} differs from wte: an untied output "
                             "projection, which GPT-2 (and picogpt's engine) does not have")
    return params


def _engine_array(name, array, shape, path, keep_compact=False):
    """`array` checked against its expected OpenAI `shape` (HF's lacks the matrices' leading 1),
    as float32 (float16 and bfloat16 widened exactly), or with keep_compact, float16 and
    bfloat16 as they are."""
    hf_shape = shape[1:] if len(shape) == 3 else shape
    if tuple(array.shape) != hf_shape:
        raise ModelError(f"{path}: tensor {name!r} is {list(array.shape)}, but config.json's "
                         f"sizes make it {list(hf_shape)}")
    if isinstance(array, compact.BFloat16):
        return array.reshape(shape) if keep_compact else compact.widened(array).reshape(shape)
    if keep_compact and array.dtype == np.float16:
        return array.reshape(shape)
    if array.dtype.kind != "f":
        raise ModelError(f"{path}: tensor {name!r} is {array.dtype}: GPT-2's weights are "
                         "floating point")
    if array.dtype != np.float32:
        array = array.astype(np.float32)  # a copy: float16 widened, float64 rounded
        array.flags.writeable = False
    return array.reshape(shape)


def _same(a, b):
    """Whether two tensors hold the same values (arrays, or compact tensors' bits)."""
    if isinstance(a, compact.Compact) or isinstance(b, compact.Compact):
        return type(a) is type(b) and np.array_equal(a.data, b.data)
    return np.array_equal(a, b)


def read_tokenizer(folder):
    """An HF folder's tokenizer: chars.json (picogpt's), vocab.json + merges.txt, or
    tokenizer.json, in that order."""
    folder = Path(folder)
    if (folder / CHARS).exists():
        return CharTokenizer.load(folder)
    from picogpt.tokenizers.bpe import BPE

    if any((folder / name).exists() for name in BPE_FILES):
        return BPE.load(folder, names=BPE_FILES)
    if (folder / TOKENIZER).exists():
        return _tokenizer_json(folder / TOKENIZER)
    raise ModelError(f"{folder}: no tokenizer ({' + '.join(BPE_FILES)}, {TOKENIZER} or "
                     f"{CHARS})")


def _tokenizer_json(path):
    """GPT-2's BPE from a tokenizer.json: its model section's vocabulary and merges, plus its
    added tokens, after checking that it is GPT-2's byte-level BPE and nothing else."""
    from picogpt.tokenizers.bpe import BPE

    doc = files.load_json(path, TOKENIZER_LIMIT, TOKENIZER, error=VocabularyError)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise VocabularyError(f"{path}: not a BPE tokenizer (model.type "
                              f"{model.get('type') if isinstance(model, dict) else None!r})")
    pre = doc.get("pre_tokenizer")
    if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel"
            and pre.get("add_prefix_space") is False and pre.get("use_regex", True) is True):
        raise VocabularyError(f"{path}: the pre-tokenizer is not GPT-2's (ByteLevel, "
                              "add_prefix_space false, use_regex true)")
    unlike = [key for key, ok in (
        ("normalizer", doc.get("normalizer") is None),
        ("post_processor", _type(doc, "post_processor") in (None, "ByteLevel")
         or _adds_nothing(doc["post_processor"])),
        ("decoder", _type(doc, "decoder") in (None, "ByteLevel")),
        ("model.dropout", model.get("dropout") is None),
        ("model.continuing_subword_prefix", not model.get("continuing_subword_prefix")),
        ("model.end_of_word_suffix", not model.get("end_of_word_suffix")),
        ("model.byte_fallback", not model.get("byte_fallback")),
    ) if not ok]
    if unlike:
        raise VocabularyError(f"{path}: {', '.join(unlike)} unlike GPT-2's byte-level BPE")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise VocabularyError(f"{path}: model.vocab must be an object, model.merges a list")
    encoder = dict(vocab)
    added = doc.get("added_tokens") or []
    if not isinstance(added, list):
        raise VocabularyError(f"{path}: added_tokens must be a list")
    for token in added:
        if not (isinstance(token, dict) and isinstance(token.get("content"), str)
                and type(token.get("id")) is int):
            raise VocabularyError(f"{path}: an added token without content and id: {token!r}"[:200])
        if encoder.setdefault(token["content"], token["id"]) != token["id"]:
            raise VocabularyError(f"{path}: added token {token['content']!r} has id "
                                  f"{token['id']}, the vocabulary {encoder[token['content']]}")
    pairs = []
    for merge in merges:
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p
                                                                  for p in pair)):
            raise VocabularyError(f"{path}: merge {len(pairs)} is not a pair of tokens: "
                                  f"{merge!r}"[:200])
        pairs.append(tuple(pair))
    return BPE.from_tables(encoder, pairs, path)


def _adds_nothing(post):
    """A TemplateProcessing that adds no token to a single text (what transformers writes)."""
    single = post.get("single") if isinstance(post, dict) else None
    return (_type({"p": post}, "p") == "TemplateProcessing" and isinstance(single, list)
            and all(isinstance(part, dict) and set(part) == {"Sequence"} for part in single))


def _type(doc, key):
    """The "type" of a tokenizer.json section; None when the section is null, "?" when it is not
    an object."""
    value = doc.get(key)
    if value is None:
        return None
    return value.get("type") if isinstance(value, dict) else "?"


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_folder(out, hparams, tokenizer, params, dtype, source):
    eot = getattr(tokenizer, "eot_id", None)
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": hparams["n_vocab"], "n_positions": hparams["n_ctx"],
        "n_ctx": hparams["n_ctx"], "n_embd": hparams["n_embd"], "n_head": hparams["n_head"],
        "n_layer": hparams["n_layer"], "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": LN_EPS, "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "tie_word_embeddings": True, "bos_token_id": eot, "eos_token_id": eot,
        "torch_dtype": dtype,
    }  # fmt: skip
    files.write_json(out / CONFIG, config)
    files.write_json(out / "generation_config.json",
                     {"bos_token_id": eot, "eos_token_id": eot} if eot is not None else {})
    tensors = to_hf(params, hparams["n_layer"])
    if dtype == "float16":
        tensors = {name: _float16(name, array, source) for name, array in tensors.items()}
    elif dtype == "bfloat16":  # each float32 rounded to its upper half, as torch rounds it
        tensors = {name: compact.bfloat16(array) for name, array in tensors.items()}
    safetensors.write(out / WEIGHTS, tensors, metadata={"format": "pt"})
    _write_hf_tokenizer(out, tokenizer, hparams)


def _float16(name, array, source):
    with np.errstate(over="ignore"):
        narrow = array.astype(np.float16)
    if not np.isfinite(narrow).all() and np.isfinite(array).all():
        raise ModelError(f"{source}: tensor {name!r} has values beyond float16's range (65504): "
                         "export it as float32")
    return narrow


def _write_hf_tokenizer(out, tokenizer, hparams):
    """vocab.json + merges.txt (and tokenizer_config.json), which GPT2Tokenizer(Fast) loads. A
    character model keeps its chars.json (which picogpt reads) and gains the same vocabulary as
    a byte-level BPE (see char_bpe), which transformers reads."""
    from picogpt.tokenizers.bpe import ENDOFTEXT, table_files

    if isinstance(tokenizer, CharTokenizer):
        tokenizer.save(out)
        encoder, merges = char_bpe(tokenizer.chars)
        special = None
    else:
        encoder, merges = tokenizer.encoder, tokenizer.merges
        special = ENDOFTEXT if ENDOFTEXT in encoder else None
    for name, data in table_files(encoder, merges, BPE_FILES).items():
        files.atomic_write(out / name, data)
    files.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": hparams["n_ctx"],
        "add_prefix_space": False, "bos_token": special, "eos_token": special,
        "unk_token": special, "errors": "replace",
    })  # fmt: skip


def char_bpe(chars):
    """(encoder, merges): GPT-2's byte-level BPE that cuts any text of these characters into
    exactly these characters, with the same ids (id i is chars[i]).

    A character of one UTF-8 byte is that byte's token. A longer one is built by merges, each
    adding its next byte to the bytes before it. Both sides of a merge must be tokens, so its
    lead byte, its continuation bytes and its partial prefixes get ids after the model's
    vocabulary; none of them comes out of valid text. Every merge's left side starts with a
    lead byte and its right side is one continuation byte, which is never a left side: so the
    byte after a prefix stays a single byte until merged, a merge only ever extends the
    character it is in, and a complete character (UTF-8 is prefix-free, and the next
    character starts with a lead or ASCII byte) extends no further."""
    from picogpt.tokenizers.bpe import bytes_to_unicode

    alphabet = bytes_to_unicode()
    encoder = {"".join(alphabet[b] for b in c.encode("utf-8")): i for i, c in enumerate(chars)}
    merges, seen = [], set()
    for c in chars:
        parts = [alphabet[b] for b in c.encode("utf-8")]
        prefix = parts[0]
        encoder.setdefault(prefix, len(encoder))  # a lead byte: merges start from a token
        for part in parts[1:]:
            encoder.setdefault(part, len(encoder))  # a continuation byte, likewise
            if (prefix, part) not in seen:
                seen.add((prefix, part))
                merges.append((prefix, part))
            prefix += part
            encoder.setdefault(prefix, len(encoder))
    return encoder, merges
