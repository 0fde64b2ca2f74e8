"""Built-in bases and tasks, data only (no training code): the small pretrained base (presets, corpus, build and cache:
base), its tasks (tasks) and facts (knowledge), real bases by short name (hub_bases) and the tasks for them
(real_task, totals_task).
"""
