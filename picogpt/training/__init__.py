"""Training a GPT-2 in NumPy: the text's ids (data.py), nanoGPT's token files and a large text
streamed into one (token_files.py), AdamW and the schedule (optimizer.py), the run folder and what
train may write or delete there (run_folder.py), what a resume state records of the folder
(resume.py), the configuration (config.py), the memory a run needs (memory.py), everything checked
before anything is written (prepare.py), and the loop (loop.py). The network's forward and
backward are in picogpt/gpt2/."""
