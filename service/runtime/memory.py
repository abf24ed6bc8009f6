"""glibc malloc settings for a server whose requests carry multi-megabyte bodies.

A 1×3×224×224 FP32 tensor in JSON is a ~3 MB body, and serving it allocates several buffers of that size (the
body, the parser's copy and tape, the float arrays). glibc hands out allocations above its mmap threshold with
``mmap`` and returns them with ``munmap``, and trims freed memory at the top of a heap above its trim threshold.
Left to its dynamic thresholds, the server faulted ~350–750 fresh pages in for every such request (measured:
1–2.6 ms of system time per request on the benchmark machine, ~10–20% of the request's CPU time).

With the mmap threshold at 32 MiB (glibc's own dynamic maximum) and the trim threshold at 64 MiB, those buffers
come from the heaps and are reused; the price is that freed memory up to the trim threshold stays with the
process (RSS under 224² JSON load: ~262 → ~274 MB). Bodies above 32 MiB still use mmap.

Nothing happens off glibc, or when the operator has set ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_``
(their setting wins), or with ``BNFOLD_REUSE_LARGE_BUFFERS=false``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("bnfold.service")

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
SETTINGS = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
OPERATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def reuse_large_buffers() -> bool:
    """Set glibc's mmap and trim thresholds (see the module text); True when they were set."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in OPERATOR_VARIABLES):
        log.info("malloc thresholds left as MALLOC_*_THRESHOLD_ set them")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux architecture it supports
        done = all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
    except (OSError, AttributeError):
        done = False
    if not done:
        log.warning("could not set glibc's malloc thresholds; large request buffers are not reused")
    return done
