"""Peak resident memory of a stretch of code, from Linux's /proc.

torch's CPU tensors bypass Python's allocator, so tracemalloc cannot see them; the process's
resident set size can. `PeakMemory` returns freed heap pages to the system (malloc_trim), resets
the kernel's high-water mark of the resident set (writing 5 to /proc/self/clear_refs) and
reports how far that mark rose above the resident size at entry. Where /proc or the reset is
missing (not Linux), `peak_mb` stays None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc


def _status_kb(field: str) -> int | None:
    """A size field of /proc/self/status (VmRSS, VmHWM) in kB, or None without /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the system, so that reusing them counts as growth again."""
    libc_name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None
    if trim is not None:
        trim(0)


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Context manager: `peak_mb` is the peak resident memory inside it, above that at entry, in MiB."""

    def __init__(self):
        self.peak_mb: float | None = None
        self._base_kb: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        _release_free_heap()
        self._base_kb = _status_kb("VmRSS") if _reset_peak() else None
        return self

    def __exit__(self, *exc) -> None:
        peak_kb = _status_kb("VmHWM")
        if self._base_kb is not None and peak_kb is not None:
            self.peak_mb = max(peak_kb - self._base_kb, 0) / 1024
