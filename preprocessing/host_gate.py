"""Per-host request limits that hold over a whole build, not per worker process (layer: preprocessing).

Why: `build.host_concurrency` and `build.host_rate` were kept by each worker process's download threads, so a
URL-list build on 64 cores could hold 64 x 4 connections to one host and start 64 x 10 requests a second there. A
URL-list build now starts `GATES` small Ray actors (no CPU) for its run; a host is kept by the one its origin hashes
to, and every download thread of every build task, on every node, asks it for a slot (concurrency), a start time
(rate), and whether the host is backing off (a 429/503 or Retry-After seen by any task backs it off for all).

The actors hold counters only: a lost one is restarted empty (the limits start over; no URL is lost), and a task
that cannot reach its gate fails as a transient fault, which the build retries. Cost: two actor calls a request,
~3 ms of CPU in all, task and gate (benchmarks/url_fetch.py, its "build-wide limits" row against the per-task one),
against the 50-300 ms a web request waits and the ~35 ms of CPU a face detection takes; hosts are spread over the
gates, one per
CPUS_PER_GATE CPUs, so no single actor serialises a large build. `downloads` uses them when its `Policy.gates` names
them (`preprocessing.build` does, for a URL list).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import logging
import time
import uuid
from typing import Any

from preprocessing.errors import TransientError

log = logging.getLogger(__name__)

GATES = 4  # actors per build, at least ...
CPUS_PER_GATE = 16  # ... and one per this many CPUs (a gate spends ~1.4 ms of CPU a request: ~700 requests/s each)
CALL_MARGIN_S = 60.0  # how much longer than its patience a caller waits for a gate's answer before giving up
_HANDLES: dict[str, Any] = {}  # this process's handles, by gate name
_LOCK = threading.Lock()


class HostGate:
    """One gate's hosts: requests in flight, the next rate slot, backoff, and what it saw (for the build's log).
    An async Ray actor: a caller waiting for a slot holds no thread of the actor."""

    def __init__(self, concurrency: int, rate: float):
        self.concurrency, self.rate = max(1, int(concurrency)), float(rate)
        self.in_flight: dict[str, int] = {}
        self.next_at: dict[str, float] = {}
        self.backoff_until: dict[str, float] = {}
        self.freed: asyncio.Condition | None = None
        self.seen = {"requests": 0, "peak_in_flight": 0, "busy": 0, "hosts": set()}

    def _cond(self) -> asyncio.Condition:
        if self.freed is None:  # made on the actor's event loop
            self.freed = asyncio.Condition()
        return self.freed

    async def acquire(self, host: str, patience: float) -> tuple[bool, float, float]:
        """Wait up to `patience` s for one of the host's slots: (held, seconds until its rate slot, seconds of
        backoff left). Held slots are given back with `release`; the rate slot is reserved here, so callers anywhere
        are spaced 1/rate apart."""
        cond = self._cond()
        async with cond:
            if self.in_flight.get(host, 0) >= self.concurrency:  # (a free slot is taken without a timer)
                try:
                    await asyncio.wait_for(cond.wait_for(lambda: self.in_flight.get(host, 0) < self.concurrency),
                                           max(0.0, patience))
                except asyncio.TimeoutError:
                    self.seen["busy"] += 1
                    return False, 0.0, 0.0
            n = self.in_flight[host] = self.in_flight.get(host, 0) + 1
            now = time.monotonic()
            start = max(now, self.next_at.get(host, 0.0))
            self.next_at[host] = start + (1.0 / self.rate if self.rate > 0 else 0.0)
            self.seen["requests"] += 1
            self.seen["peak_in_flight"] = max(self.seen["peak_in_flight"], n)
            self.seen["hosts"].add(host)
            return True, start - now, max(0.0, self.backoff_until.get(host, 0.0) - now)

    async def release(self, host: str) -> None:
        cond = self._cond()
        async with cond:
            left = self.in_flight.get(host, 0) - 1
            if left > 0:
                self.in_flight[host] = left
            else:
                self.in_flight.pop(host, None)
            now = time.monotonic()
            if host not in self.in_flight and self.next_at.get(host, 0.0) < now \
                    and self.backoff_until.get(host, 0.0) < now:  # an idle host's state goes: memory follows the
                self.next_at.pop(host, None)                      # hosts in flight (and the distinct-host count)
                self.backoff_until.pop(host, None)
            cond.notify_all()

    async def backoff(self, host: str, seconds: float) -> None:
        """A task saw a 429/503 (or a Retry-After): the host waits `seconds` for every task."""
        self.backoff_until[host] = max(self.backoff_until.get(host, 0.0), time.monotonic() + seconds)

    async def stats(self) -> dict[str, Any]:
        """What it saw, and the CPU seconds its process has used (benchmarks/url_fetch.py counts them)."""
        return {**self.seen, "hosts": len(self.seen["hosts"]), "cpu_s": time.process_time()}


def start(concurrency: int, rate: float, gates: int | None = None) -> tuple[str, ...]:
    """Start a build's gates on the connected Ray (named, owned by this driver: they end with it); their names.
    `gates`: how many (default: GATES, or one per CPUS_PER_GATE of the cluster's CPUs when that is more)."""
    import ray

    if gates is None:
        gates = max(GATES, int(ray.cluster_resources().get("CPU", 0)) // CPUS_PER_GATE)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=10_000)(HostGate)
    run = uuid.uuid4().hex[:12]
    names = tuple(f"dcgan-host-gate-{run}-{i}" for i in range(gates))
    handles = [actor.options(name=name).remote(concurrency, rate) for name in names]
    ray.get([h.stats.remote() for h in handles])  # started before any task asks
    with _LOCK:
        _HANDLES.update(zip(names, handles))
    return names


def stop(names: tuple[str, ...]) -> dict[str, Any]:
    """End a build's gates; what they saw, summed (hosts, requests, the highest count in flight on one host, and
    how often a caller gave up waiting for a slot)."""
    import ray

    total: dict[str, Any] = {"hosts": 0, "requests": 0, "peak_in_flight": 0, "busy": 0}
    for name in names:
        handle = _handle(name)
        try:
            seen = ray.get(handle.stats.remote(), timeout=10)
            total = {k: (max if k == "peak_in_flight" else sum)((total[k], seen[k])) for k in total}
        except Exception:  # noqa: BLE001 - its figures are for the log; the build's result does not depend on them
            pass
        ray.kill(handle, no_restart=True)
        with _LOCK:
            _HANDLES.pop(name, None)
    return total


def cpu_seconds(names: tuple[str, ...]) -> float:
    """CPU seconds the gates' processes have used so far."""
    import ray

    return sum(s["cpu_s"] for s in ray.get([_handle(n).stats.remote() for n in names]))


def _handle(name: str):
    with _LOCK:
        handle = _HANDLES.get(name)
    if handle is None:
        import ray

        handle = ray.get_actor(name)
        with _LOCK:
            _HANDLES[name] = handle
    return handle


def _gate_of(names: tuple[str, ...], host: str):
    digest = hashlib.blake2b(host.encode(), digest_size=8).digest()
    return _handle(names[int.from_bytes(digest, "big") % len(names)])


def _call(method, *args, timeout: float):
    import ray

    try:
        return ray.get(method.remote(*args), timeout=timeout)
    except Exception as err:  # noqa: BLE001 - an unreachable gate: the chunk is retried, no URL is lost
        raise TransientError(f"per-host gate unreachable ({type(err).__name__}: {err})"[:300]) from None


def acquire(names: tuple[str, ...], host: str, patience: float) -> tuple[bool, float, float]:
    """`HostGate.acquire` on the host's gate; raises TransientError if the gate does not answer."""
    return _call(_gate_of(names, host).acquire, host, patience, timeout=patience + CALL_MARGIN_S)


def release(names: tuple[str, ...], host: str) -> None:
    """Give a slot back, without waiting for the answer (the request is done; a lost release only makes the host's
    limit stricter until its gate restarts empty)."""
    try:
        _gate_of(names, host).release.remote(host)
    except Exception as err:  # noqa: BLE001 - as above
        log.warning("%s: per-host gate unreachable (%s: %s)", host, type(err).__name__, err)


def backoff(names: tuple[str, ...], host: str, seconds: float) -> None:
    _call(_gate_of(names, host).backoff, host, seconds, timeout=CALL_MARGIN_S)
