"""Text mode: a PEFT LoRA for a local causal language model, from the same YAML as image runs.

`task_type: text-generation` in a config routes `python -m engine train|check` here (engine/__main__.py
decides before the image config is built). The pieces, one job each:

- config.py     the text field table (lora-scripts' LLM defaults: rank 8, alpha 16, q_proj/v_proj, dropout 0.1)
- sources.py    .txt / .jsonl / .json / .csv files -> samples (plain text, prompt/completion or chat messages)
- tokenize.py   samples -> token ids and which tokens are trained (chat: the assistant turns only)
- packing.py    whole samples packed into rows of max_length, the held-out split, the step plan
- model.py      the local transformers folder, its tokenizer, quantisation and the PEFT LoRA
- lean.py       the engine's own forward for Llama-class layouts (fewer kernels and activations)
- loss.py       next-token loss without materialising the full logits
- step.py       one training step, plain or replayed as a CUDA graph
- train.py      the loop: checkpoints, exact resume, Ctrl-C, events, TensorBoard, loss.png
- evaluate.py   held-out perplexity before and after, sample generations
- save.py       the PEFT adapter folder (+ settings in its metadata) and the merged model
- check.py      `python -m engine check` for text: tokens, truncation, packing, steps
- cli.py        the command-line entry points
"""
