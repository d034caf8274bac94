"""Reference implementations the tests compare picogpt with."""

import numpy as np
import pytest

from picogpt.formats import hf

# OpenAI's tensor name -> HuggingFace's: the one table, picogpt's own (test_hf checks it against
# the files transformers writes; load_state_dict below is strict).
hf_names = hf.hf_names


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
    model = transformers.GPT2LMHeadModel(config).eval()
    state = {name: torch.tensor(np.array(value))
             for name, value in hf.to_hf(params, hparams["n_layer"]).items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]
    model.load_state_dict(state)
    return model, torch
