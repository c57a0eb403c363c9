"""A probe's table rerun against its recorded one: the rows whose cells differ, and how many are equal.

    python -m benchmarks.table_diff benchmarks/results/first_contact_10_tasks.md table.md [--ignore s]

Rows are the markdown table rows of both files (`| a | b | ... |`; the new file may be the probe's printed
log), matched by their first two cells (model and optimizer, task and optimizer); a new row is compared with
the recorded row of the same key and the same number of cells (a file with several tables: the first such
recorded row), column by column under the recorded table's header, the columns named in `--ignore` (the
seconds) left out. Printed: per differing row, each differing column as recorded → now, then the counts of
equal rows, differing rows and new rows without a recorded one.
"""
from __future__ import annotations

import argparse


def table_rows(path: str) -> list[tuple[list[str], list[str]]]:
    """(cells, its table's header cells) for every markdown table row of the file at `path` below a header
    (a row followed by a |---| separator); rows without a header above them (a probe's log) get []."""
    with open(path) as f:
        lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in f if line.startswith("|")]
    rows, header = [], []
    for i, row in enumerate(lines):
        if i + 1 < len(lines) and set(lines[i + 1][0]) == {"-"}:
            header = row
        elif set(row[0]) != {"-"}:
            rows.append((row, header))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recorded")
    parser.add_argument("new")
    parser.add_argument("--ignore", nargs="*", default=["s"], help="columns left out of the comparison")
    args = parser.parse_args()
    recorded: dict[tuple[str, str, int], tuple[list[str], list[str]]] = {}
    for row, header in table_rows(args.recorded):
        recorded.setdefault((row[0], row[1], len(row)), (row, header))
    equal = differ = unrecorded = 0
    for row, _ in table_rows(args.new):
        old, header = recorded.get((row[0], row[1], len(row)), (None, []))
        if old is None:
            unrecorded += 1
            print(f"new row {row[0]} | {row[1]}: {' | '.join(row[2:])}")
            continue
        changes = [f"  {name}: {a} → {b}" for name, a, b in zip(header, old, row)
                   if a != b and name not in args.ignore]
        if changes:
            differ += 1
            print(f"{row[0]} | {row[1]}:", *changes, sep="\n")
        else:
            equal += 1
    print(f"equal rows {equal}, differing {differ}, without a recorded row {unrecorded}")


if __name__ == "__main__":
    main()
