"""Hooks that remove themselves, kept for the user's backward when gnfx's own backward ran them first.

The true-Fisher statistics (gnfx.fisher, `fisher="mc"` or `"type2"`) start extra backward passes from the
model output z inside the user's `loss.backward()`, before the user's backward goes on below z. Those passes
run every tensor hook between z and the blocks, as the user's does. A hook that removes itself when it runs
(a one-shot hook: torchdeq's `hook_ift=True` implicit differentiation registers one on f(z*) that calls
`handle.remove()` and then solves the adjoint fixed point with autograd.grad, whose root is that tensor again)
was then gone when the user's backward reached its tensor: the parameters got the gradient without it (the
1-step gradient instead of the implicit one), silently. `undone_hook_removals` records each removal made by
`torch.utils.hooks.RemovableHandle.remove` while gnfx's pass runs and puts the removed hooks back afterwards,
so that the user's backward finds the hooks the model registered, and each of gnfx's passes ran them as the
user's backward does (the statistics are those of the gradients the hooks make).
"""
from __future__ import annotations

import contextlib

from torch.utils.hooks import RemovableHandle


@contextlib.contextmanager
def undone_hook_removals():
    """While inside, each RemovableHandle.remove() removes its hook and remembers it; on exit every removed
    hook is put back in its dictionary under its handle's id (module docstring)."""
    remove, removed = RemovableHandle.remove, []

    def remembered_remove(handle: RemovableHandle) -> None:
        refs = (handle.hooks_dict_ref, *handle.extra_dict_ref)
        removed.extend((ref, handle.id, ref()[handle.id]) for ref in refs if ref() is not None and handle.id in ref())
        remove(handle)

    RemovableHandle.remove = remembered_remove
    try:
        yield
    finally:
        RemovableHandle.remove = remove
        for ref, key, hook in removed:
            hooks = ref()
            if hooks is not None:
                hooks[key] = hook
