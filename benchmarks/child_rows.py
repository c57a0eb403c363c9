"""The probes' table rows, one child process each (benchmarks.library_probe, family_probe, detection_probe,
pyg_probe, diffusers_probe, einops_probe, medseg_probe, clip_probe, ultra_probe, task_probe, rl_probe, tabts_probe,
sciml_probe, fcast_probe, lucid_probe, nlp_probe, audio_probe, hfseq_probe, loops_probe, quant_probe, gen_probe, implicit_probe,
spiking_probe, meta_probe, prefs_probe, points_probe; trace_semantics uses its cells).

Each model runs in a process of its own, so that one model's memory, threads or crash do not reach the
next; the child prints its row of the table last.
"""
from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
import warnings

import torch

import gnfx


def raised(stderr: str) -> str:
    """The first line of the exception that ended a child's run (the last line naming one), else its last line."""
    lines = stderr.strip().splitlines() or ["?"]
    return next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception|Exit)\b", line)), lines[-1])


def cell(text: str, width: int) -> str:
    """`text` cut to `width` characters for one cell of a markdown table (no bar, no line break)."""
    return text[:width].replace("|", "/").replace("\n", " ")


def gnfx_warnings(caught, width: int) -> list[str]:
    """The distinct gnfx warnings among the `caught` warnings (warnings.catch_warnings(record=True)), each
    cut to `width` characters for a cell."""
    return sorted({cell(str(w.message), width) + "..." for w in caught if str(w.message).startswith("gnfx")})


def capture_cells(c, model, fallbacks: bool = True) -> tuple[str, ...]:
    """The cells a probe's row gives a compiled model `c` of `model`: how its graph was captured, the share of
    the trainable entries in curvature blocks and (`fallbacks`) the first three parameters outside them with
    why; each "–" when `c` is no compiled model or is not captured yet (its error says why)."""
    cells = ["–"] * (3 if fallbacks else 2)
    if not isinstance(c, gnfx.CompiledModel):
        return tuple(cells)
    try:
        covered, total = c.layers.coverage(dict(model.named_parameters()))
        cells[:2] = c.layers.form, f"{100 * covered / total:.1f}%"
        if fallbacks:
            more = len(c.layers.fallbacks) - 3
            cells[2] = ("; ".join(f"{f.param}: {f.reason[:70]}" for f in c.layers.fallbacks[:3]) or "–") + (
                f" (and {more} more)" if more > 0 else "")
    except Exception:  # noqa: BLE001  (not captured yet: the error says why)
        pass
    return tuple(cells)


def library(probe: str, name: str):
    """The module `name` of a library the probe `probe` (its module name) runs models of, imported; none is a
    dependency of gnfx: where it is missing, exit naming it and how to make it importable."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise SystemExit(f"{probe} needs {name} ({exc}): unpack its wheel without dependencies and put it on "
                         f"PYTHONPATH (module docstring)") from exc


def problem_row(name: str, optimizer: str, kind: str, hparams: dict, steps: int, build, problem, exactness,
                **options) -> str:
    """`one_batch_row` of a probe whose `build(name)` makes the model (in training mode) and `problem(name)` gives
    (batch, loss_of(model, batch)); its exactness cell `exactness(name, kind, hparams)`; `options`: one_batch_row's."""
    def made():
        model = build(name).train()
        batch, loss_of = problem(name)
        return model, lambda c: loss_of(c, batch)

    return one_batch_row(name, optimizer, kind, hparams, steps, lambda: exactness(name, kind, hparams), made, **options)


def one_batch_row(name: str, optimizer: str, kind: str, hparams: dict, steps: int, exactness, made,
                  widths: tuple[int, int, int] = (160, 300, 700), digits: int = 3) -> str:
    """The row of a probe that trains a model on one batch: `exactness()` (its cell, for "kfac_lr" only), then
    `made()` -> (model, loss(c) of the compiled model or the model itself[, after_backward()]) at seed 0, `steps`
    steps of gnfx.compile(model, kind, **hparams) (or torch.optim.AdamW for kind "adamw"), `after_backward()`
    (what the user's loop does between the backward and the step: a second optimizer's step, gradients
    cancelled) after each backward, and the cells: capture, share in
    blocks, exactness, the losses (`digits` significant), the fallbacks, gnfx's warnings and the error, cut to
    `widths` (warnings, fallbacks, error), and the seconds."""
    torch.set_num_threads(1)
    start, losses, error = time.time(), [], ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            exact = exactness() if optimizer == "kfac_lr" else "–"
        except Exception as exc:  # noqa: BLE001 -- what a user would see is the result
            exact = "error"
            error = f"exactness: {type(exc).__name__}: {exc}"
        torch.manual_seed(0)
        model, loss_of, *after_backward = made()
        c = None
        try:
            if kind == "adamw":
                c, step = model, torch.optim.AdamW(model.parameters(), **hparams)
            else:
                c = step = gnfx.compile(model, kind, **hparams)
            for _ in range(steps):
                loss = loss_of(c)
                loss.backward()
                for then in after_backward:
                    then()
                step.step()
                step.zero_grad()
                losses.append(f"{loss.item():.{digits}g}")
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {exc}"
    form, blocks, outside = capture_cells(c, model)
    said = gnfx_warnings(caught, widths[0])
    setting = ", ".join(f"{k}={v}" for k, v in hparams.items()) or "defaults"
    return (f"| {name} | {optimizer} ({setting}) | {form} | {blocks} | {exact} | {', '.join(losses) or '–'} | "
            f"{cell(outside, widths[1])} | {'; '.join(said) or '–'} | {cell(error, widths[2]) or '–'} | "
            f"{time.time() - start:.0f} |")


def child_row(command: list[str], timeout: float, failed, timed_out: str) -> str:
    """The last line the child `command` prints, its row; `failed(exception line)` if it exits with an
    error, `timed_out` if it runs past `timeout` seconds."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return timed_out
    lines = done.stdout.strip().splitlines()
    return lines[-1] if done.returncode == 0 and lines else failed(raised(done.stderr))


def write_table(rows: list[str], path: str | None) -> None:
    """The table's rows into `path`, if one is given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")


def case_table(cases: list[tuple[tuple[str, ...], list[str]]], header: list[str], timeout: float,
               path: str | None) -> None:
    """The table of `header` (its two lines) with a row per case (its first cells, the child's command), as
    the child prints it; a child that fails or runs past `timeout` seconds gets a row of the case's cells,
    then the error, the other cells empty. Each row printed as it comes, the table written to `path`."""
    cells = header[0].count("|") - 1
    rows = list(header)
    for first, command in cases:
        named, empty = "| " + " | ".join(first) + " | ", " |" * (cells - len(first) - 1)
        row = child_row(command, timeout, lambda error: f"{named}error: {error[:300]} |{empty}",
                        f"{named}over the {timeout:.0f} s timeout |{empty}")
        rows.append(row)
        print(row, flush=True)
    write_table(rows, path)


def probe_main(doc: str, module: str, probe, cases: dict[str, list[str]], header: list[str], steps: int,
               timeout: float, chosen=lambda first, second, given: True) -> None:
    """The command line of a probe whose rows are (first, second) pairs, e.g. model and optimizer: `cases`
    names the two axes and their choices ({"models": [...], "optimizers": [...]}, in that order), each an
    option of that name whose default is every choice, `--steps` (default `steps`), `--timeout` seconds per
    row (default `timeout`), `--out`; each row from `probe(first, second, steps)` in a child process
    (`python -m module --one first second`, one intra-op thread), through case_table. `chosen(first,
    second, given)`: whether a pair is run when the second axis was `given` on the command line or not."""
    (axis, firsts), (other, seconds) = cases.items()
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{axis}", nargs="+", choices=firsts, default=list(firsts))
    parser.add_argument(f"--{other}", nargs="+", choices=seconds)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds per {axis[:-1]} and {other[:-1]}")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a child's run
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        print(probe(*args.one, args.steps))
        return
    given = getattr(args, other)
    rows = [((first, second), [sys.executable, "-m", module, "--one", first, second, "--steps", str(args.steps)])
            for first in getattr(args, axis) for second in (given or seconds) if chosen(first, second, bool(given))]
    case_table(rows, header, args.timeout, args.out)
