"""picogpt: GPT-2 end to end in plain Python and NumPy."""

__version__ = "0.1.0"
