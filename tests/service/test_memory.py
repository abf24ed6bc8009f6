"""BNFOLD_REUSE_LARGE_BUFFERS: glibc's thresholds really change, the operator's MALLOC_* settings win, off is off.

Each case runs in a fresh interpreter (malloc settings are process-wide and glibc's defaults apply only to a
process nobody has tuned). Whether a 24 MiB block came from mmap is read from glibc's chunk header: bit 1 of the
size word before the block (IS_MMAPPED), stable glibc ABI since the 1990s. 24 MiB: below the 32 MiB threshold set
here, and above anything whose free during interpreter start-up could have raised glibc's dynamic threshold.
"""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import threading

import pytest

from service.runtime import memory
from service.server import Server
from service.settings import Settings

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)

PROBE = """
import ctypes, sys
from service.runtime import memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
tuned = memory.reuse_large_buffers() if sys.argv[1] == "tune" else None
block = libc.malloc(24 << 20)
size_word = ctypes.c_size_t.from_address(block - ctypes.sizeof(ctypes.c_size_t)).value
print(tuned, bool(size_word & 2))
"""


def probe(mode: str, **env: str) -> tuple[str, bool]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], out[1] == "True"


def test_untuned_glibc_maps_a_large_block_and_the_tuning_takes_it_from_the_heap() -> None:
    assert probe("leave") == ("None", True)
    assert probe("tune") == ("True", False)


def test_an_operator_malloc_threshold_wins() -> None:
    assert probe("tune", MALLOC_MMAP_THRESHOLD_="131072") == ("False", True)
    assert probe("tune", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"


@pytest.mark.parametrize("setting", [True, False])
def test_service_start_applies_the_setting(monkeypatch: pytest.MonkeyPatch, setting: bool) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(memory, "reuse_large_buffers", lambda: calls.append(True) or True)
    server = Server(Settings(reuse_large_buffers=setting, grpc_port=0))

    async def start_and_stop() -> None:
        await server.start()
        await server.stop()

    # a thread of its own: a browser test's sync Playwright may have left an event loop running in this thread
    starter = threading.Thread(target=asyncio.run, args=(start_and_stop(),))
    starter.start()
    starter.join()
    assert calls == ([True] if setting else [])
