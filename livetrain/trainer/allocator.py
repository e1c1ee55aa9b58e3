"""glibc malloc settings for a process that frees and re-allocates the same buffers every step."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold on 64-bit
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds, unless the user set them; True if set.

    Every training step frees its activations and gradients and allocates them again
    at the same sizes. With glibc's adaptive defaults some processes settle into
    handing those megabytes back to the kernel at each free and faulting them in
    again at the next step: in 2 of 5 identical runs on the 2-core test machine,
    2.5 to 3.3 million page faults and 3 to 5 s of system time on a 22 s run (the
    others: 0.2 million, 0.5 s). Fixed thresholds keep freed buffers in the process
    for the next step; the memory held is the step's own peak, which it needs anyway.
    """
    if not sys.platform.startswith("linux"):
        return False
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    ):
        return False  # the user's choice stands
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
