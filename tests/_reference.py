"""Reference implementations the tests compare picogpt with."""

import numpy as np
import pytest

# A block's tensors: HuggingFace GPT2LMHeadModel's name -> OpenAI's (both use Conv1D's [nx, nf]).
HF_BLOCK_NAMES = {
    "ln_1.weight": "ln_1/g", "ln_1.bias": "ln_1/b", "ln_2.weight": "ln_2/g", "ln_2.bias": "ln_2/b",
    "attn.c_attn.weight": "attn/c_attn/w", "attn.c_attn.bias": "attn/c_attn/b",
    "attn.c_proj.weight": "attn/c_proj/w", "attn.c_proj.bias": "attn/c_proj/b",
    "mlp.c_fc.weight": "mlp/c_fc/w", "mlp.c_fc.bias": "mlp/c_fc/b",
    "mlp.c_proj.weight": "mlp/c_proj/w", "mlp.c_proj.bias": "mlp/c_proj/b",
}  # fmt: skip


def hf_names(n_layer):
    """OpenAI's tensor name -> HuggingFace's, for every tensor of a GPT-2."""
    names = {"model/wte": "transformer.wte.weight", "model/wpe": "transformer.wpe.weight",
             "model/ln_f/g": "transformer.ln_f.weight", "model/ln_f/b": "transformer.ln_f.bias"}
    for i in range(n_layer):
        for hf_name, tf_name in HF_BLOCK_NAMES.items():
            names[f"model/h{i}/{tf_name}"] = f"transformer.h.{i}.{hf_name}"
    return names


def hf_model(params, hparams):
    """HuggingFace's GPT2LMHeadModel (float32, eval mode) holding `params`; and torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=hparams["n_vocab"] - 1, eos_token_id=hparams["n_vocab"] - 1,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config).eval()
    state = {}
    for tf_name, hf_name in hf_names(hparams["n_layer"]).items():
        value = params[tf_name]
        state[hf_name] = torch.tensor(np.array(value[0] if value.ndim == 3 else value))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    hf.load_state_dict(state)
    return hf, torch
