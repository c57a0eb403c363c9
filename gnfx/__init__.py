"""gnfx: a compiler for Gauss-Newton preconditioned training in PyTorch.

    model = gnfx.compile(model, optimizer="kfac", loss="cross_entropy")   # step size from the GGN
    loss = F.cross_entropy(model(x), y); loss.backward(); model.step(); model.zero_grad()
"""
from gnfx import transforms
from gnfx.api import COMMON, compile
from gnfx.compiled import CompiledModel
from gnfx.diagnose import diagnose
from gnfx.errors import CaptureError, ConfigError, GnfxError
from gnfx.layouts import register_layer_kind
from gnfx.preconditioners import REGISTRY
from gnfx.preconditioners.registration import register_preconditioner

__all__ = ["compile", "diagnose", "CompiledModel", "GnfxError", "CaptureError", "ConfigError", "REGISTRY", "COMMON",
           "register_preconditioner", "register_layer_kind", "transforms"]
