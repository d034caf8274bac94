"""The files a model folder holds, as bytes and names: TensorFlow's checkpoint bundles
(tf_checkpoint.py), safetensors, and the OpenAI and HuggingFace folder layouts. A format knows
no GPT-2 math beyond the table of tensor names and shapes, and never resolves a model's name."""
