"""The preconditioners, by the name users pass as `gnfx.compile(..., optimizer=NAME)`.

A new preconditioner is one file in this folder plus one line here.
"""
from gnfx.preconditioners.diag import Diagonal

REGISTRY = {
    Diagonal.name: Diagonal,
}
