"""The reward a `lopt grpo` run logged (its metrics.jsonl): the first and last logged mean, and its curve
(`--plot`, reward_curve.png)."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def reward_summary(metrics_path: str) -> dict:
    """Mean reward of the first and of the last logged step (each a mean over that logging window)."""
    rewards = [m["reward"] for m in read_metrics(metrics_path) if isinstance(m.get("reward"), (int, float))]
    if not rewards:
        return {}
    return {"reward_first_log": rewards[0], "reward_last_log": rewards[-1]}


def plot_reward_curve(output_dir: str, filename: str = "reward_curve.png", window: int = 5) -> str:
    """Plot the mean reward per logged step (each a mean over its logging window) from metrics.jsonl, with a
    running mean over `window` logs, into output_dir/filename. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "reward" in m]
    path = os.path.join(output_dir, filename)
    steps = [m["step"] for m in metrics]
    rewards = [m["reward"] for m in metrics]
    smooth = [
        sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
        for i in range(len(rewards))
    ]
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.plot(steps, rewards, marker="o", markersize=3, linewidth=0.8, alpha=0.6, label="mean reward per log")
    if len(rewards) >= window:
        ax.plot(steps, smooth, linewidth=2.2, label=f"running mean ({window} logs)")
    if rewards and 0.0 <= min(rewards) and max(rewards) <= 1.0:
        ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    title = f"lopt grpo: {os.path.basename(os.path.abspath(output_dir))}"
    args_path = os.path.join(output_dir, "lopt_args.json")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            run_args = json.load(f)
        lopt = (
            f", k={run_args.get('num_blocks')}"
            if run_args.get("method") in ("lopt", "ll", "lopt_joint")
            else ""
        )
        title += f" (--method {run_args.get('method')}{lopt})"
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
