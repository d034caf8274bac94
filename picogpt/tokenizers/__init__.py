"""Text to token ids and back: GPT-2's byte-level BPE (bpe.py) and the character tokenizer of
trained models (chars.py), each built from the tables it is given. Imports only files and errors."""
