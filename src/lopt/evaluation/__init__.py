"""Scoring a model: task accuracy and retention perplexity (evaluate), lm-evaluation-harness and the built-in knowledge
probe (lm_eval_tasks), and what a real base knows about the world, with its prose and code perplexity sets
(world_knowledge).
"""
