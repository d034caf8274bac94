"""GPT-2, the network: everything that is its math, for inference and training alike.

- params.py: the one table of the parameters' names and shapes, and its checks;
- kernels.py: the math both directions run on (LayerNorm, GELU, softmax, the products);
- engine.py: the inference forward with its KV cache;
- compact.py: weight matrices kept in float16, bfloat16 or int8, widened inside the products;
- layers.py: the training layers, each forward beside its backward;
- network.py: the training layers composed into a block and the whole network, and the
  parameters as one flat buffer;
- parallel.py: a pass split over the cores, and the thread count;
- memory.py: what memory the network asks of the machine, and how.

The network imports nothing of picogpt above it: no file format, tokenizer or command.
"""
