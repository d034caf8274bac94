"""From a prompt to text: `Model` (a network tied to its tokenizer) and what it does with logits:
sampling, the generation options, stop strings, the batched decode loop with its KV cache and
sliding window, log-probabilities, and the chat prompt."""
