"""module_attributes: the attributes a traced forward sets on the model's modules, taken back after tracing.

torch.fx and torch.export run the model's forward on stand-ins for its inputs (Proxies; FakeTensors
with symbolic sizes). A forward that builds something on its first call and keeps it on a module
(ultralytics' `BaseModel.loss`: `if self.criterion is None: self.criterion = self.init_criterion()`,
whose v8DetectionLoss holds `torch.arange(reg_max)`; a cache of a rotary table or a mask) keeps what it
built from those stand-ins: torch.export puts back the attributes a module had before (as its
`_detect_attribute_assignment` does) but leaves those it did not have, so the module would keep a
FakeTensor, and every later eager call (the model's own forward where capture failed, an opaque
submodule's code) computes with it: a gradient or statistic that is itself a FakeTensor, or a
data-dependent error at the step. `attributes_kept(model)` puts back, on exit, every module's own
attributes (its `__dict__` outside torch.nn.Module's registries: parameters, buffers, submodules and
hooks are its own concern) as they were on entry: those the forward added are removed, those it
replaced restored, so the first eager call builds them again from real tensors. (In-place changes
inside an attribute's object are not seen.)
"""
from __future__ import annotations

import contextlib

from torch import nn

REGISTRIES = frozenset(vars(nn.Module()))  # _parameters, _buffers, _modules, the hook dicts, training, ...


@contextlib.contextmanager
def attributes_kept(model: nn.Module):
    """While inside, the forward may set attributes on `model`'s modules; on exit each module's own
    attributes are those it had on entry (module doc)."""
    saved = [(m, {k: v for k, v in vars(m).items() if k not in REGISTRIES}) for m in model.modules()]
    try:
        yield
    finally:
        for module, attributes in saved:
            for name in [k for k in vars(module) if k not in REGISTRIES and k not in attributes]:
                del module.__dict__[name]
            module.__dict__.update(attributes)
