"""The block table that `print(model)` and `model.report()` show."""
from __future__ import annotations

from gnfx.variants import NotCaptured


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def report(model) -> str:
    """Blocks (name, kind, shapes, preconditioner, state memory, why that preconditioner) and the
    parameter registration."""
    table, opt = model.layers, model.optimizer
    if isinstance(table, NotCaptured):
        return f"gnfx: {table!r}"
    why = {name: e.reason for name, e in table.plan.entries.items()}
    cost = model.cost()  # state memory from the cost model, whose figures equal the allocation
    rows = []
    for b in table:
        shapes = " ".join(f"{k}{'x'.join(map(str, v))}" for k, v in b.shapes.items())
        kind = b.kind + (f" [{b.role}]" if b.role else "")
        rows.append([b.name, kind, shapes, b.preconditioner, format_bytes(cost[b.name].memory_bytes), why[b.name]])
    for f in table.fallbacks:
        rows.append([f.param, "fallback", "x".join(map(str, f.shape)) or "scalar", f.preconditioner,
                     format_bytes(cost[f.param].memory_bytes), why[f.param]])
    covered, total = table.coverage(dict(model.named_parameters()))
    out = [f"gnfx: {len(table)} curvature blocks, graph captured with {table.form}"
           + (f" ({table.capture})" if table.capture != table.form else ""),
           format_table(["block", "kind", "shapes", "preconditioner", "state", "why"], rows),
           f"parameters in curvature blocks: {covered:,} of {total:,} "
           f"({100 * covered / max(total, 1):.1f}%); fallback: {total - covered:,}",
           "", "parameter registration:"]
    shapes_of = {n: "x".join(map(str, p.shape)) for n, p in model.named_parameters()}
    reg = [[n, shapes_of[n], f"block {b.name}" + (f" ({table.notes[n]})" if n in table.notes else "")]
           for b in table for n in b.params]
    reg += [[f.param, "x".join(map(str, f.shape)) or "scalar", f"fallback: {f.reason}"] for f in table.fallbacks]
    out.append(format_table(["parameter", "shape", "accounted for as"], reg))
    if table.leaves:
        out += ["", "opaque (leaf) submodules:"] + [f"  {k}: {v}" for k, v in table.leaves.items()]
    if opt.steps:
        out.append(f"\nsteps: {opt.steps}, statistic steps every {opt.stat_every}")
    return "\n".join(out)
