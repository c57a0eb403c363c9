"""A probe's table rerun against its recorded one: the rows whose cells differ, and how many are equal.

    python -m benchmarks.table_diff benchmarks/results/first_contact_10_tasks.md table.md [--ignore s]

Rows are the markdown table rows of both files (`| a | b | ... |`; the new file may be the probe's printed
log), matched by their first two cells (model and optimizer, task and optimizer). A new row under a header (the
probe's --out file) is compared with the first recorded row of the same key column by column of the same name
(or the one new name containing the recorded one or contained in it: "losses" for "losses (4 steps)"), so a probe
that gained or lost columns since its record still compares the columns both tables have (those only one has are
named once); a new row without a header (a log) with the first recorded row of the same key and the
same number of cells, column by column under the recorded header. The columns named in `--ignore` (the seconds)
are left out. Printed: per differing row, each differing column as recorded → now, then the counts of equal rows,
differing rows and new rows without a recorded one.
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


def column_names(recorded: list[str], new: list[str]) -> dict[str, str]:
    """The new table's name of each recorded column that it has: the same name, else the one new name of 4 or
    more characters that contains the recorded name or that the recorded name contains."""
    names = {}
    for name in recorded:
        near = [n for n in new if min(len(n), len(name)) >= 4 and (n in name or name in n)]
        if name in new or len(near) == 1:
            names[name] = name if name in new else near[0]
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recorded")
    parser.add_argument("new")
    parser.add_argument("--ignore", nargs="*", default=["s"], help="columns left out of the comparison")
    args = parser.parse_args()
    recorded: dict[tuple[str, str], list[tuple[list[str], list[str]]]] = {}
    for row, header in table_rows(args.recorded):
        recorded.setdefault((row[0], row[1]), []).append((row, header))
    equal = differ = unrecorded = 0
    unmatched_columns: set[str] = set()
    for row, new_header in table_rows(args.new):
        same_size = [(old, header) for old, header in recorded.get((row[0], row[1]), []) if len(old) == len(row)]
        candidates = recorded.get((row[0], row[1]), []) if new_header else same_size
        if not candidates:
            unrecorded += 1
            print(f"new row {row[0]} | {row[1]}: {' | '.join(row[2:])}")
            continue
        old, header = (same_size or candidates)[0]
        names = column_names(header, new_header or header)
        now = dict(zip(new_header or header, row))
        unmatched_columns.update((set(header) - set(names)) | (set(now) - set(names.values())))
        changes = [f"  {name}: {a} → {now[names[name]]}" for name, a in zip(header, old)
                   if name in names and a != now[names[name]] and name not in args.ignore]
        if changes:
            differ += 1
            print(f"{row[0]} | {row[1]}:", *changes, sep="\n")
        else:
            equal += 1
    if unmatched_columns:
        print("columns in one table only (not compared):", ", ".join(sorted(unmatched_columns)))
    print(f"equal rows {equal}, differing {differ}, without a recorded row {unrecorded}")


if __name__ == "__main__":
    main()
