"""Reference implementations the tests compare picogpt with."""

import numpy as np
import pytest


def hf_model(params, hparams):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=hparams["n_vocab"] - 1, eos_token_id=hparams["n_vocab"] - 1,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    names = {"ln_1.weight": "ln_1/g", "ln_1.bias": "ln_1/b", "ln_2.weight": "ln_2/g",
             "ln_2.bias": "ln_2/b", "attn.c_attn.weight": "attn/c_attn/w",
             "attn.c_attn.bias": "attn/c_attn/b", "attn.c_proj.weight": "attn/c_proj/w",
             "attn.c_proj.bias": "attn/c_proj/b", "mlp.c_fc.weight": "mlp/c_fc/w",
             "mlp.c_fc.bias": "mlp/c_fc/b", "mlp.c_proj.weight": "mlp/c_proj/w",
             "mlp.c_proj.bias": "mlp/c_proj/b"}  # fmt: skip
    state = {"transformer.wte.weight": params["model/wte"], "transformer.wpe.weight":
             params["model/wpe"], "transformer.ln_f.weight": params["model/ln_f/g"],
             "transformer.ln_f.bias": params["model/ln_f/b"]}  # fmt: skip
    for i in range(hparams["n_layer"]):
        for hf_name, tf_name in names.items():
            value = params[f"model/h{i}/{tf_name}"]
            state[f"transformer.h.{i}.{hf_name}"] = value[0] if value.ndim == 3 else value
    state = {k: torch.tensor(np.array(v)) for k, v in state.items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    hf.load_state_dict(state)
    return hf, torch
