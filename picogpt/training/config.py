"""A training run's configuration: nanoGPT's recipes as defaults (from scratch, and for
fine-tuning with --init), the options merged over them and checked, and the command line that
trains the same configuration from the start."""

import shlex

from picogpt.errors import TrainingError

# nanoGPT's CPU recipe for Tiny Shakespeare: trains in about a minute here.
DEFAULTS = {
    "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12,
    "max_iters": 2000, "lr": 1e-3, "min_lr": 1e-4, "warmup_iters": 100,
    "lr_decay_iters": None,  # None: max_iters
    "dropout": 0.0, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    "eval_interval": 250, "eval_iters": 20, "log_interval": 10, "seed": 1337, "grad_accum": 1,
}  # fmt: skip
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


# nanoGPT's fine-tuning recipe (config/finetune_shakespeare.py over its train.py's defaults):
# the defaults of a run with --init for what the user does not give; a constant learning rate
# (min_lr follows lr), the block size of the model.
FINETUNE_DEFAULTS = {
    "batch_size": 1, "grad_accum": 32, "max_iters": 20, "lr": 3e-5, "min_lr": None,
    "warmup_iters": 0, "dropout": 0.0, "beta2": 0.95, "eval_interval": 5, "eval_iters": 40,
}  # fmt: skip
ARCHITECTURE = ("n_layer", "n_head", "n_embd")


def make_config(options, saved=None, init_hparams=None):
    """The training configuration: `options` (key -> value, None where not given), else the
    saved run's values, else the defaults (nanoGPT's fine-tuning recipe with --init's model,
    whose architecture it takes, DEFAULTS otherwise)."""
    config = dict(DEFAULTS)
    if init_hparams is not None:
        config.update(FINETUNE_DEFAULTS)
        config.update({k: init_hparams[k] for k in ARCHITECTURE})
        config["block_size"] = init_hparams["n_ctx"]
        for key in ARCHITECTURE:
            if options.get(key) is not None and options[key] != init_hparams[key]:
                raise TrainingError(f"--{key.replace('_', '-')} {options[key]}: the model of "
                                    f"--init has {init_hparams[key]}; its architecture is kept")
        if (options.get("block_size") or 0) > init_hparams["n_ctx"]:
            raise TrainingError(f"--block-size {options['block_size']} is more than the "
                                f"context of the model of --init ({init_hparams['n_ctx']})")
    if saved:
        config.update({k: v for k, v in saved.items() if k in DEFAULTS})
        if saved.get("min_lr") == saved.get("lr") and options.get("min_lr") is None:
            config["min_lr"] = None  # a constant rate (a fine-tune's): min_lr follows a new --lr
    for key in DEFAULTS:
        value = options.get(key)
        if value is None:
            continue
        if saved and key in SHAPE_KEYS and value != saved.get(key):
            raise TrainingError(f"--{key.replace('_', '-')} {value}: the model being resumed "
                                f"has {saved.get(key)}; its shape cannot change")
        config[key] = value
    if config["min_lr"] is None:  # --init: a constant learning rate unless told otherwise
        config["min_lr"] = config["lr"]
    if config["n_embd"] % config["n_head"]:
        raise TrainingError(f"--n-embd {config['n_embd']} is not divisible by "
                            f"--n-head {config['n_head']}")
    if config["min_lr"] > config["lr"]:
        given = options.get("min_lr") is not None
        raise TrainingError(f"--min-lr {config['min_lr']:g} is above --lr {config['lr']:g}" + (
            "" if given else f" (--min-lr's {'saved' if saved else 'default'} value: give a "
                             "--min-lr at most --lr)"))
    return config


def command_line(text, out, config):
    """The `picogpt train` command that trains this configuration from the start (on `text`,
    or on config["data"]'s token files)."""
    flags = [f"--{key.replace('_', '-')} {config[key]}" for key in DEFAULTS
             if config[key] is not None and key != "log_interval"]  # fmt: skip
    for key in ("init", "tokenizer"):
        if config.get(key) not in (None, "chars"):
            flags.insert(0, f"--{key} {shlex.quote(str(config[key]))}")
    data = config.get("data")
    source = f"--data {shlex.quote(data)}" if data else shlex.quote(str(text))
    where = f"{source} --out {shlex.quote(str(out))}"
    return f"picogpt train {where} " + " ".join(flags)
