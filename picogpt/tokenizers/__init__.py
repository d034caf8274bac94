"""Text to token ids and back: GPT-2's byte-level BPE (bpe.py) and the character tokenizer of
trained models (chars.py), each built from the tables it is given. Imports only files and errors.

GPT-2's own vocabulary ships in gpt2/ (OpenAI's encoder.json and vocab.bpe, byte for byte, with
their licence), so training on GPT-2's tokens needs neither the network nor a downloaded model."""

from pathlib import Path

GPT2_VOCABULARY = Path(__file__).parent / "gpt2"  # a folder that BPE.load reads
