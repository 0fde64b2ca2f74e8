"""The PNG plots of a compare: loss curves, memory and time, accuracy against retention, and every point's
accuracy/retention front.
"""

from __future__ import annotations

import os

from lopt.experiments.compare.select import pareto_front, points_of, rise


def write_plots(results: dict, output_dir: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    names = list(methods)
    # one colour and marker per method, the same in every plot (the default cycle repeats after 10)
    palette = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")  # tab20 pairs near-identical shades
    colors = {name: palette(i % palette.N) for i, name in enumerate(names)}
    markers = {name: "osD^v<>ph*"[i % 10] for i, name in enumerate(names)}

    fig, ax = plt.subplots(figsize=(8.5, 4))
    for name in names:
        steps, losses = zip(*methods[name]["curve"])
        ax.plot(steps, losses, label=name, color=colors[name])
    if results["setup"].get("trainer") == "grpo":  # a GRPO run's curve is its mean reward per logged window
        ax.set(xlabel="step", ylabel="reward", title="GRPO reward (mean over seeds)")
    else:
        ax.set(xlabel="step", ylabel="task loss", title="Training task loss (mean over seeds)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "loss_curves.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    bars = (
        ("activation_peak_bytes", 2**20, "activation peak (MB)"),
        ("peak_memory_bytes", 2**20, "peak process memory (MB)"),
        ("step_time_s", 1, "median step time (s)"),
    )
    for ax, (key, scale, title) in zip(axes, bars):
        ax.bar(names, [(methods[n].get(key) or 0) / scale for n in names], color=[colors[n] for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
    _save(fig, output_dir, "memory_time.png")

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for name in names:
        m = methods[name]
        if m.get("task_accuracy") is None or m.get("retention_ppl") is None:
            continue
        ppl, std = m["retention_ppl"], m.get("retention_ppl_std", 0)
        ax.errorbar(
            100 * m["task_accuracy"],
            ppl,
            xerr=100 * m.get("task_accuracy_std", 0),
            yerr=[[min(std, 0.9 * ppl)], [std]],  # the log axis cannot show a bar below zero
            fmt=markers[name],
            color=colors[name],
            capsize=3,
            label=name,
        )
    before = next((m.get("retention_ppl_before") for m in methods.values()), None)
    if before:
        ax.axhline(before, color="grey", linestyle=":", label="before training")
    ax.set(
        xlabel="task exact match (%), mean ± std over seeds",
        ylabel="retention perplexity (lower = kept more)",
    )
    ax.set_yscale("log")  # a collapsing method can sit orders of magnitude above the rest
    ax.set_title("Accuracy vs retention (each method at its validation-chosen setting)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "accuracy_retention.png")
    if results.get("points"):
        _plot_fronts(results, output_dir, colors, markers)
    from lopt.experiments.compare.world_knowledge import plot_knowledge_fronts

    plot_knowledge_fronts(results, colors, markers, lambda fig, name: _save(fig, output_dir, name))


def _plot_fronts(results: dict, output_dir: str, colors: dict, markers: dict) -> None:
    """Test accuracy against test retention rise for every (method, lr, steps) point; each method's front a line."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    rises = [100 * r for p in results["points"] if (r := rise(p)) is not None]
    for name in results["methods"]:
        points = [
            p for p in points_of(results, name) if p.get("task_accuracy") is not None and rise(p) is not None
        ]
        if not points:
            continue
        ax.scatter(
            [100 * rise(p) for p in points],
            [100 * p["task_accuracy"] for p in points],
            marker=markers[name],
            color=colors[name],
            alpha=0.6,
        )
        front = pareto_front(points)
        ax.plot(
            [100 * rise(p) for p in front],
            [100 * p["task_accuracy"] for p in front],
            marker=markers[name],
            color=colors[name],
            label=name,
        )
    ax.set_ylim(-2, 102)
    if rises:  # room for the markers at both ends of the log-like axis
        ax.set_xlim(min(rises) * 1.5 if min(rises) < 0 else -1, max(max(rises) * 1.5, 20))
    ax.set_xscale("symlog", linthresh=10)  # rises run from a few % to orders of magnitude
    ax.set(
        xlabel="retention perplexity rise over the base model (% of base, test half of the retention texts)",
        ylabel="task exact match on test (%)",
        title="Accuracy vs retention: every (lr, steps) point, each method's front as a line",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    _save(fig, output_dir, "fronts.png")


def _save(fig, output_dir: str, name: str) -> None:
    import matplotlib.pyplot as plt

    path = os.path.join(output_dir, name)
    tmp = path + ".tmp.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
