"""Summaries of the runs: the best LR per optimizer, ratios against AdamW, JSON and a markdown table.

The best run of an optimizer on a task is the one that reaches the target in the fewest
training seconds; among runs that do not reach it, the one with the lowest final validation
loss. Ratios divide the best run's numbers by AdamW's best run of the same benchmark (below
1 is better than AdamW for every ratio). The training-loss target has its own best run per
optimizer (`best_train`, the same rule on the training-loss target and the final training loss)
and its own ratios (`train_steps_to_target`, `train_seconds_to_target`), against AdamW's best run
for that target: each target is compared at each optimizer's best learning rate for it.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from benchmarks.train import NOT_RUN, RunResult

BASELINE = "adamw"
RATIO_FIELDS = {  # ratio name -> RunResult field
    "seconds_to_target": "seconds_to_target",
    "steps_to_target": "steps_to_target",
    "fwd_bwd_ms": "fwd_bwd_ms",
    "opt_step_ms": "opt_step_ms",
    "peak_mem_mb": "peak_mem_mb",
}


TRAIN_RATIO_FIELDS = {"train_steps_to_target": "steps_to_train_target",
                      "train_seconds_to_target": "seconds_to_train_target"}


def lr_text(lr: float | None) -> str:
    """An lr for tables and labels; None (the optimizer's defaults, no lr given) as "none"."""
    return "none" if lr is None else format(lr, "g")


def _finite(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


def _rank(run: RunResult) -> tuple:
    return (not run.reached, run.seconds_to_target if run.reached else math.inf, _finite(run.final_loss))


def _rank_train(run: RunResult) -> tuple:
    final = _finite(run.curve[-1].fit_loss) if run.curve else math.inf
    return (not run.reached_train, run.seconds_to_train_target if run.reached_train else math.inf, final)


def best_run(runs: list[RunResult], train: bool = False) -> RunResult:
    """The run with the fewest seconds to the validation target (`train`: to the training-loss
    target), then the lowest final loss; runs that did not train last."""
    ran = [run for run in runs if run.status not in NOT_RUN]
    return min(ran, key=_rank_train if train else _rank) if ran else runs[0]


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base <= 0:
        return None
    return value / base


def summarize(runs: list[RunResult]) -> list[dict]:
    """One entry per (task, optimizer), in task order and best first within a task.

    An entry holds the best run with its curve, every run without curves, and the ratios to AdamW.
    """
    groups: dict[tuple[str, str], list[RunResult]] = {}
    task_order: dict[str, int] = {}
    for run in runs:
        groups.setdefault((run.task, run.optimizer), []).append(run)
        task_order.setdefault(run.task, len(task_order))
    best = {key: best_run(group) for key, group in groups.items()}
    best_train = {key: best_run(group, train=True) for key, group in groups.items()}
    entries = []
    for (task, optimizer), group in sorted(groups.items(), key=lambda item: (task_order[item[0][0]],
                                                                             _rank(best[item[0]]))):
        chosen = best[(task, optimizer)]
        baseline = best.get((task, BASELINE))
        ratios = {name: _ratio(getattr(chosen, field), getattr(baseline, field) if baseline else None)
                  for name, field in RATIO_FIELDS.items()}
        chosen_train, baseline_train = best_train[(task, optimizer)], best_train.get((task, BASELINE))
        ratios.update({name: _ratio(getattr(chosen_train, field),
                                    getattr(baseline_train, field) if baseline_train else None)
                       for name, field in TRAIN_RATIO_FIELDS.items()})
        entries.append({
            "task": task,
            "optimizer": optimizer,
            "best": dataclasses.asdict(chosen),
            "best_train": {k: v for k, v in dataclasses.asdict(chosen_train).items() if k != "curve"},
            "ratios_vs_adamw": ratios,
            "runs": [{k: v for k, v in dataclasses.asdict(run).items() if k != "curve"} for run in group],
        })
    return entries


def write_json(path: Path, meta: dict, entries: list[dict]) -> None:
    """The whole record: run settings, and every entry of `summarize`."""
    path.write_text(json.dumps({**meta, "results": entries}, indent=1) + "\n")


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(meta: dict, entries: list[dict]) -> str:
    """A markdown report: one table per task, in the order of `entries`, then the runs that did not train."""
    lines = [f"# gnfx benchmarks: {meta['mode']}", "",
             f"torch {meta['torch']}, {meta['threads']} threads, {meta['platform']}; total {meta['seconds']:.0f} s. "
             f"Times are training seconds ({'CPU seconds of the training thread, ' if meta.get('clock') == 'cpu' else ''}"
             "evaluation excluded); ×AdamW columns divide by AdamW's best run "
             "of the same task (below 1 is better). Peak memory is the resident-set growth during the run.", ""]
    for task, info in meta["tasks"].items():
        rows = [e for e in entries if e["task"] == task]
        ran = [e for e in rows if e["best"]["status"] not in NOT_RUN]
        lines += [f"## {task}", "", f"Target validation loss {info['target']:g}, training-loss target "
                  f"{_fmt(info.get('train_target'), 'g')}, at most {info['max_steps']} steps, "
                  f"evaluated every {info['eval_every']} steps.", "",
                  "| optimizer | best LR | status | steps to target | s to target | ×AdamW s | ×AdamW steps "
                  "| train target: best LR | steps | s | ×AdamW s | ×AdamW steps "
                  "| fwd+bwd ms | opt step ms | peak MB | final val loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in ran:
            b, r, t = e["best"], e["ratios_vs_adamw"], e["best_train"]
            lines.append(f"| {e['optimizer']} | {lr_text(b['lr'])} | {b['status']} | {_fmt(b['steps_to_target'], 'd')} "
                         f"| {_fmt(b['seconds_to_target'], '.2f')} | {_fmt(r['seconds_to_target'], '.2f')} "
                         f"| {_fmt(r['steps_to_target'], '.2f')} | {lr_text(t['lr'])} "
                         f"| {_fmt(t['steps_to_train_target'], 'd')} | {_fmt(t['seconds_to_train_target'], '.2f')} "
                         f"| {_fmt(r['train_seconds_to_target'], '.2f')} | {_fmt(r['train_steps_to_target'], '.2f')} "
                         f"| {_fmt(b['fwd_bwd_ms'], '.2f')} "
                         f"| {_fmt(b['opt_step_ms'], '.2f')} | {_fmt(b['peak_mem_mb'], '.1f')} "
                         f"| {_fmt(b['final_loss'], '.4f')} |")
        lines.append("")
        for e in rows:
            for run in e["runs"]:
                if run["status"] in NOT_RUN:
                    lines.append(f"- {run['status']}: {e['optimizer']} at lr {lr_text(run['lr'])}: {run['reason']}")
        lines.append("")
    return "\n".join(lines)
