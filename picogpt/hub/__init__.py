"""Where models come from and go: a name to a folder (the one resolver), downloads from OpenAI or
the HuggingFace hub, reading a folder in either layout into (hparams, tokenizer, params), and
exporting any model to either layout."""
