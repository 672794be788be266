"""The malloc check: which allocator a process runs on, and the warning a CPU backend gives without tcmalloc."""

import logging
import os
import subprocess
import sys

from model_handlers import allocator
from model_handlers.allocator import TCMALLOC, malloc_in_use, warn_without_tcmalloc

GLIBC_MAPS = "7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


def test_the_allocator_is_read_from_the_process_maps():
    assert malloc_in_use(GLIBC_MAPS) == "glibc"
    assert malloc_in_use(GLIBC_MAPS + f"7f20-7f30 r-xp 0 08:01 2 {TCMALLOC}\n") == "tcmalloc"
    assert malloc_in_use(GLIBC_MAPS + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/libjemalloc.so.2\n") == "jemalloc"


def test_a_process_started_with_tcmalloc_preloaded_runs_on_it():
    code = "from model_handlers.allocator import malloc_in_use; print(malloc_in_use())"
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    preloaded = subprocess.run([sys.executable, "-c", code], env={**env, "LD_PRELOAD": TCMALLOC},
                               capture_output=True, text=True, check=True)
    assert (plain.stdout.strip(), preloaded.stdout.strip()) == ("glibc", "tcmalloc")


def test_a_cpu_backend_without_tcmalloc_says_how_to_get_it(monkeypatch, caplog):
    log = logging.getLogger("test-allocator")
    monkeypatch.setattr(allocator, "malloc_in_use", lambda: "glibc")
    with caplog.at_level(logging.WARNING, logger="test-allocator"):
        warn_without_tcmalloc(log)
    assert f"LD_PRELOAD={TCMALLOC}" in caplog.text
    caplog.clear()
    monkeypatch.setattr(allocator, "malloc_in_use", lambda: "tcmalloc")
    with caplog.at_level(logging.WARNING, logger="test-allocator"):
        warn_without_tcmalloc(log)
    assert caplog.text == ""
