"""The measurements every command reports, one module per kind: task.py (greedy predictions and
the task score), retention.py (KL from the base model and degenerate answers on general prompts),
perplexity.py (prior text), teacher.py (demonstration log-likelihood, teacher agreement, the
student's samples), lessons.py (lesson and feedback fit), rules.py (rule gaps, compliance, prior
answers, loops, drift), evaluation.py (one evaluation of a set of adapters, from the others) and
version.py (one adapter version's numbers on the held-out prompts, the rule preflight)."""
