"""The preconditioners, by the name users pass as `gnfx.compile(..., optimizer=NAME)`.

A new preconditioner is one file in this folder plus one line here.
"""
from gnfx.preconditioners.diag import Diagonal
from gnfx.preconditioners.ekfac import EKFAC
from gnfx.preconditioners.kfac import KFAC
from gnfx.preconditioners.muon import Muon
from gnfx.preconditioners.rank1 import RankK
from gnfx.preconditioners.shampoo import Shampoo
from gnfx.preconditioners.soap import SOAP

REGISTRY = {
    Diagonal.name: Diagonal,
    RankK.name: RankK,
    KFAC.name: KFAC,
    Shampoo.name: Shampoo,
    SOAP.name: SOAP,
    EKFAC.name: EKFAC,
    Muon.name: Muon,
}
