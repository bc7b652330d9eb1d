"""`runner eval`: a recipe's pipeline scored by lm-eval's tasks, offline.

scoring: batched log-likelihoods over the model's static KV cache (pure torch);
adapter: lm-eval's LM interface on a built pipeline; catalog: the tasks (shipped in tasks/, or
the user's --include-path); command: the command's flow, its table and its JSON.
Only scoring imports nothing from lm-eval: the rest needs the `eval` extra.
"""
