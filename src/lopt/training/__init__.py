"""What a training command runs around the trainer: flags and recipes (arguments), LoPT and the baselines (methods),
GRPO rewards (rewards) and what `lopt grpo` reads and sets on lopt's tasks (rl), block-parallel training
(block_parallel, one rank's stage: block_stage) and the local multi-process launcher (launch).
"""
