"""GPT-2's parameters: the one table of their names and shapes, and the checks that a set of
tensors is what a set of hparams describes.

Names are OpenAI's (`model/wte`, `model/h0/attn/c_attn/w`, ...); HuggingFace's folders are read
into them (formats/). Weights are in OpenAI's [1, n_in, n_out] shape.
"""

import re


def param_shapes(hparams):
    """Every tensor of a GPT-2 checkpoint: OpenAI's name -> shape, in the network's order."""
    d = hparams["n_embd"]
    shapes = {"model/wte": (hparams["n_vocab"], d), "model/wpe": (hparams["n_ctx"], d)}
    for i in range(hparams["n_layer"]):
        p = f"model/h{i}/"
        shapes.update({
            p + "ln_1/g": (d,), p + "ln_1/b": (d,),
            p + "attn/c_attn/w": (1, d, 3 * d), p + "attn/c_attn/b": (3 * d,),
            p + "attn/c_proj/w": (1, d, d), p + "attn/c_proj/b": (d,),
            p + "ln_2/g": (d,), p + "ln_2/b": (d,),
            p + "mlp/c_fc/w": (1, d, 4 * d), p + "mlp/c_fc/b": (4 * d,),
            p + "mlp/c_proj/w": (1, 4 * d, d), p + "mlp/c_proj/b": (d,),
        })  # fmt: skip
    shapes.update({"model/ln_f/g": (d,), "model/ln_f/b": (d,)})
    return shapes


HPARAMS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def check_hparams(hparams):
    """Raise ValueError unless `hparams` gives GPT-2's five sizes as positive integers, with
    n_embd a multiple of n_head."""
    for key in HPARAMS:
        if key not in hparams:
            raise ValueError(f"{key} is missing")
        value = hparams[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if hparams["n_embd"] % hparams["n_head"]:
        raise ValueError(f"n_embd {hparams['n_embd']} is not divisible by n_head "
                         f"{hparams['n_head']}")


def is_matrix(name):
    """Whether tensor `name` is one of the weight matrices a product streams (the blocks' and the
    token embedding): those may be float16 or bfloat16 too (gpt2/compact.py); the rest, small,
    are float32."""
    return name == "model/wte" or (name.startswith("model/h") and name.endswith("/w"))


def check_params(params, hparams):
    """Raise ValueError unless `params` are exactly the tensors `hparams` describe: float32, or
    float16 / bfloat16 for the matrices (is_matrix).

    Nothing is built from hparams before it is compared with the tensors: n_layer is checked
    against the layers the names show first, so the table of shapes is never longer than the
    checkpoint, and every other size is a tensor's shape the file holds."""
    check_hparams(hparams)
    layers = {m.group(1) for m in map(_LAYER.match, params) if m}
    if hparams["n_layer"] != len(layers):
        raise ValueError(f"n_layer is {hparams['n_layer']} but the checkpoint's tensors are those "
                         f"of {len(layers)} layer(s)")
    expected = param_shapes(hparams)
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"the checkpoint has no tensor {name!r}")
        if tuple(params[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(params[name].shape)}; these "
                             f"hparams need {shape}")
        dtype = str(params[name].dtype)
        allowed = ("float32", "float16", "bfloat16") if is_matrix(name) else ("float32",)
        if dtype not in allowed:
            raise ValueError(f"tensor {name!r} is {dtype}, expected {' or '.join(allowed)}")
    extra = sorted(set(params) - expected.keys())
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        shown = ", ".join(map(repr, extra[:3])) + more
        raise ValueError(f"the checkpoint has {len(extra)} tensor(s) that GPT-2 with these "
                         f"hparams does not use: {shown}")


_LAYER = re.compile(r"model/h(\d+)/")
