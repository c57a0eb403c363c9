"""plan: which preconditioner serves which block.

`optimizer` is a preconditioner name, applied to every block; parameters that no block claims get
the diagonal preconditioner (DESIGN §1), unless the preconditioner serves them itself (Shampoo
needs only a gradient's shape, so it takes every loose tensor of order >= 2). The plan is written into the LayerTable
(`block.preconditioner`, `fallback.preconditioner`).
"""
from __future__ import annotations

from gnfx.errors import ConfigError
from gnfx.preconditioners import REGISTRY

FALLBACK = "diag"


def make_plan(table, optimizer) -> dict[str, str]:
    """Assign a preconditioner name to every block and fallback; returns {block or param: name}."""
    if not isinstance(optimizer, str) or optimizer not in REGISTRY:
        raise ConfigError(f"optimizer={optimizer!r} is not a gnfx optimizer; valid names are: "
                          f"{', '.join(REGISTRY)}")
    for block in table:
        block.preconditioner = optimizer
    for fb in table.fallbacks:
        fb.preconditioner = optimizer if REGISTRY[optimizer].claims_fallback(fb.shape) else FALLBACK
    return {**{b.name: b.preconditioner for b in table}, **{f.param: f.preconditioner for f in table.fallbacks}}


def specs(table, hparams_of) -> list:
    """(class, hparams, blocks, loose parameters) for each preconditioner the plan uses."""
    used = {}
    for block in table:
        used.setdefault(block.preconditioner, ([], []))[0].append(block)
    for fb in table.fallbacks:
        used.setdefault(fb.preconditioner, ([], []))[1].append(fb.param)
    return [(REGISTRY[name], hparams_of(name), blocks, params) for name, (blocks, params) in used.items()]
