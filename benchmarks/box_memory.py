"""What a first touch of memory costs on this box, against a second touch of the same amount: a property of the machine
the benchmarks run on, not of the project, measured so that the scale figures can be read.

Why: on the VM these benchmarks run on, a 1 GB file written into never-used memory took 10.6 s of kernel time, and
0.3 s once that memory had been touched once (a hand check with `dd`; perf put the time in the kernel's copy into the
new page-cache pages). A stage that first reaches into such memory (the 300k runs, whose files, object store and
processes need ~18 of the box's 23 GB) pays for it, and its phases look superlinear in N when the box is. Physical
machines back their memory from the start; there both passes cost about the same.

What it does: touches (one write per 4 KiB page) all but `--leave` GiB of the memory the kernel says is available, in
1 GiB anonymous mappings that it releases as it goes, twice. It prints the seconds and kernel seconds per GiB of each
pass and their ratio; pass 1 over pass 2 near 1.0 means the memory was backed already. `scale.py --warm-memory` runs
one pass before it measures, and records it.

Run: `.venv/bin/python benchmarks/box_memory.py` (seconds on a warm box; ~6-10 s per cold GiB on this VM).
"""

from __future__ import annotations

import argparse
import mmap
import resource
import time

GIB = 1 << 30
PAGE = 4096


def available_gib() -> float:
    """MemAvailable, GiB."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def touch(gib: int) -> dict:
    """Write one byte per page of `gib` 1-GiB anonymous mappings, one mapping at a time: {gib, s, sys_s} (the kernel's
    share from getrusage)."""
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(gib):
        m = mmap.mmap(-1, GIB)
        for i in range(0, GIB, PAGE):
            m[i] = 1
        m.close()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"gib": gib, "s": round(time.perf_counter() - t, 2), "sys_s": round(r1.ru_stime - r0.ru_stime, 2)}


def warm(leave: float = 2.0) -> dict:
    """One pass over all but `leave` GiB of the available memory (`touch`), with the amount it found available."""
    avail = available_gib()
    return {"available_gib": round(avail, 1), **touch(max(0, int(avail - leave)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--leave", type=float, default=2.0, help="GiB of the available memory not touched")
    args = ap.parse_args()
    first = warm(args.leave)
    second = touch(first["gib"])
    print(f"{first['available_gib']} GiB available; {first['gib']} GiB touched per pass")
    print("| pass | s per GiB | kernel s per GiB |")
    print("| --- | --- | --- |")
    for name, p in (("1 (first touch)", first), ("2 (the same amount again)", second)):
        print(f"| {name} | {p['s'] / max(p['gib'], 1):.2f} | {p['sys_s'] / max(p['gib'], 1):.2f} |")
    print(f"ratio, pass 1 / pass 2: **{first['s'] / max(second['s'], 1e-9):.2f}x**")


if __name__ == "__main__":
    main()
