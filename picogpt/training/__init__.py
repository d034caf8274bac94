"""Training a GPT-2 in NumPy: the text's ids (data.py), AdamW and the schedule (optimizer.py), the
run folder and what train may write or delete there (run_folder.py), the configuration
(config.py), the memory a run needs (memory.py), everything checked before anything is written
(prepare.py), and the loop (loop.py). The network's forward and backward are in picogpt/gpt2/."""
