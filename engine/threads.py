"""How many llama.cpp threads an engine uses by default.

llama.cpp takes two counts: `n_threads` for steps that decode one token per sequence and
`n_threads_batch` for steps that read prompt tokens. Its CPU threads synchronise at a barrier
after every operation of the graph (hundreds per token), so one of them losing its core for a
moment stalls them all. A node also runs Python threads at every token (the scheduler's
sampling, the event loop framing and sending the token, on a one-machine mesh the entry too):
with as many decode threads as cores, those take the cores from llama.cpp mid-token. Measured
on 2 cores (BENCHMARKS.md, "Overhead: decode threads"): through entry + node, 1 decode thread
beats 2. Prompt reading is a few large steps with little Python between them, so it keeps
every core.

Above 4 cores the default stays at every core: one core is a smaller share there and this
was not measured on such machines.
"""

from __future__ import annotations

import os
from pathlib import Path

# Up to this many cores, one is left to the Python threads while decoding.
SMALL_MACHINE_CORES = 4


def usable_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Cores among `cpus` (default: usable_cpus()), SMT siblings counted once, as llama.cpp's
    own default does: a second hardware thread of a busy core adds little to a matrix-vector
    product. Where the topology can't be read (not Linux), every logical CPU counts."""
    cpus = usable_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        try:
            siblings = (sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add(siblings)
    return max(1, len(cores))


def default_threads(cores: int | None = None) -> tuple[int, int]:
    """(n_threads, n_threads_batch) for a machine with `cores` physical cores (default: this
    one's): decoding leaves one core free on machines of 2 to SMALL_MACHINE_CORES cores;
    prompt reading uses them all."""
    cores = physical_cores() if cores is None else max(1, cores)
    decode = cores - 1 if 2 <= cores <= SMALL_MACHINE_CORES else cores
    return decode, cores
