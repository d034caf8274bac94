"""GPT-2, the network: everything that is its math, for inference and training alike.

- engine.py: the inference forward with its KV cache, and the kernels it runs on;
- layers.py: the training layers, each forward beside its backward;
- network.py: the training layers composed into a block and the whole network, and the
  parameters as one flat buffer;
- cores.py: a batch split over the cores.

The network imports nothing of picogpt above it: no file format, tokenizer or command.
"""
