"""PNG plots of the validation loss of each optimizer's best run, against steps and against seconds."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from benchmarks.report import lr_text  # noqa: E402


def plot_task(path: Path, task: str, target: float, entries: list[dict]) -> None:
    """Two panels for `task`: validation loss vs steps and vs training seconds, target dashed."""
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for entry in entries:
        best = entry["best"]
        if not best["curve"]:
            continue
        label = f"{entry['optimizer']} (lr {lr_text(best['lr'])})"
        steps = [p["step"] for p in best["curve"]]
        seconds = [p["seconds"] for p in best["curve"]]
        losses = [p["val_loss"] for p in best["curve"]]
        line, = by_step.plot(steps, losses, label=label)
        by_time.plot(seconds, losses, label=label, color=line.get_color())
    for ax, xlabel in ((by_step, "step"), (by_time, "training seconds")):
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label="target")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.grid(True, which="both", alpha=0.3)
    by_time.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"{task}: best learning rate per optimizer")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
