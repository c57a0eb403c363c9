"""The block table that `print(model)` and `model.report()` show."""
from __future__ import annotations

from gnfx.errors import NoCostModel
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


def _shape(name: str, shape: tuple) -> str:
    """A block's factor or weight shape as the table shows it: "A4609x4609", or for a factor kept as
    its diagonal blocks, (groups, m, b, b) (gnfx.layouts.base), "A(5 blocks of 927)"."""
    if name in ("A", "S") and len(shape) == 4:
        groups, m, b = shape[:3]
        return f"{name}({f'{groups}x' if groups > 1 else ''}{m} blocks of {b})"
    return f"{name}{'x'.join(map(str, shape))}"


def block_table(table, state_bytes: dict[str, int] | None = None) -> str:
    """A row per curvature block of the LayerTable (block, kind [attention role], factor shapes,
    preconditioner) and per fallback parameter, then its optimizer state given `state_bytes`
    (name -> bytes; "unknown" for a name it lacks), and why that preconditioner serves it once the
    table is planned."""
    why = {name: e.why for name, e in table.plan.entries.items()} if table.plan is not None else None
    rows = [[b.name, b.kind + (f" [{b.role}]" if b.role else ""),
             " ".join(_shape(k, v) for k, v in b.shapes.items()), b.preconditioner or "-"]
            for b in table]
    rows += [[f.param, "fallback", "x".join(map(str, f.shape)) or "scalar", f.preconditioner or "-"]
             for f in table.fallbacks]
    for row in rows:
        if state_bytes is not None:
            row.append(format_bytes(state_bytes[row[0]]) if row[0] in state_bytes else "unknown")
        row += [why[row[0]]] if why is not None else []
    header = ["block", "kind", "shapes", "preconditioner"]
    header += (["state"] if state_bytes is not None else []) + (["why"] if why is not None else [])
    return format_table(header, rows)


def leaf_lines(table) -> list[str]:
    """The submodules kept opaque (leaves of the captured graph), with the reason, and under each the
    layers inside it: opened (their own graphs' blocks) or why not (passes/opaque_children.py)."""
    if not table.leaves:
        return []
    def innermost(path):  # the leaf whose code calls the layer at `path`
        return max((leaf for leaf in table.leaves if not leaf or path.startswith(leaf + ".")), key=len, default=None)
    lines = ["", "opaque (leaf) submodules:"]
    for leaf, why in table.leaves.items():  # "": the model's own forward (passes/opaque_root.py)
        lines.append(f"  {leaf or '(the model itself)'}: {why}")
        lines += [f"    {path}: {state}" for path, state in table.opened.items() if innermost(path) == leaf]
    return lines


def report(model) -> str:
    """Blocks (name, kind, shapes, preconditioner, state memory, why that preconditioner) and the
    parameter registration."""
    table, opt = model.layers, model.optimizer
    if isinstance(table, NotCaptured):
        return f"gnfx: {table!r}"
    try:  # state memory from the cost model, whose figures equal the allocation
        state_bytes = {r.name: r.memory_bytes for r in model.cost().rows}
    except NoCostModel:  # a preconditioner without cost formulas: its state memory is unknown
        state_bytes = {}
    covered, total = table.coverage(dict(model.named_parameters()))
    out = [f"gnfx: {len(table)} curvature blocks, graph captured with {table.form}"
           + (f" ({table.capture})" if table.capture != table.form else ""),
           block_table(table, state_bytes),
           f"parameters in curvature blocks: {covered:,} of {total:,} "
           f"({100 * covered / max(total, 1):.1f}%); fallback: {total - covered:,}",
           "", "parameter registration:"]
    shapes_of = {n: "x".join(map(str, p.shape)) for n, p in model.named_parameters()}
    reg = [[n, shapes_of[n], f"block {b.name}" + (f" ({table.notes[n]})" if n in table.notes else "")]
           for b in table for n in b.held_params]
    reg += [[f.param, "x".join(map(str, f.shape)) or "scalar", f"fallback: {f.reason}"] for f in table.fallbacks]
    out.append(format_table(["parameter", "shape", "accounted for as"], reg))
    out += leaf_lines(table)
    if opt.steps:
        out.append(f"\nsteps: {opt.steps}, statistic steps every {opt.stat_every}")
    return "\n".join(out)
