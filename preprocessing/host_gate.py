"""Per-host request limits that hold over a whole build, not per worker process (layer: preprocessing).

Why: `build.host_concurrency` and `build.host_rate` were kept by each worker process's download threads, so a
URL-list build on 64 cores could hold 64 x 4 connections to one host and start 64 x 10 requests a second there. A
URL-list build now starts `GATES` small Ray actors (no CPU) for its run; a host is kept by the one its origin hashes
to, and every download thread of every build task, on every node, asks it for a slot (concurrency), a start time
(rate), and whether the host is backing off (a 429/503 or Retry-After seen by any task backs it off for all).

The actors hold counters only: a lost one is restarted empty (the limits start over; no URL is lost), and a task
that cannot reach its gate fails as a transient fault, which the build retries. A slot is a lease that lapses a
request's timeout (plus a margin) after its start, so a task that dies holding slots does not shut a host out.
Cost: two actor calls a request, ~3 ms of CPU in all, task and gate (benchmarks/url_fetch.py, its "build-wide
limits" row against the per-task one), against the 50-300 ms a web request waits and the ~35 ms of CPU a face
detection takes; hosts are spread over the gates, one per CPUS_PER_GATE CPUs, so no single actor serialises a large
build. `downloads` uses them when its `Policy.gates` names them (`preprocessing.build` does, for a URL list).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import threading
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


class _Host:
    """One host's state in its gate: the leases in flight (id -> when it lapses), the next start the rate allows,
    the end of its backoff, and the callers waiting for a slot."""

    __slots__ = ("leases", "next_at", "backoff_until", "waiters", "freed")

    def __init__(self):
        self.leases: dict[int, float] = {}
        self.next_at = self.backoff_until = 0.0
        self.waiters = 0
        self.freed = asyncio.Condition()  # made on the actor's event loop


class HostGate:
    """One gate's hosts and what it saw (for the build's log). An async Ray actor: a caller waiting for a slot holds
    no thread of it. A slot is a lease that lapses `hold_s` after its start: a task that dies holding one (a lost
    node, a killed worker), or a caller that gave up on the answer, cannot shut its host out for the rest of the
    build."""

    def __init__(self, concurrency: int, rate: float):
        self.concurrency, self.rate = max(1, int(concurrency)), float(rate)
        self.hosts: dict[str, _Host] = {}
        self.ids = itertools.count(uuid.uuid4().int >> 72)  # a restarted gate's ids are not an old holder's
        self.seen = {"requests": 0, "peak_in_flight": 0, "busy": 0, "hosts": 0, "lapsed": 0}

    def _host(self, host: str) -> _Host:
        state = self.hosts.get(host)
        if state is None:
            state = self.hosts[host] = _Host()
            self.seen["hosts"] += 1  # host states made: a host idle long enough to be dropped counts again
        return state

    def _lapse(self, state: _Host, now: float) -> None:
        for lease in [k for k, until in state.leases.items() if until < now]:
            del state.leases[lease]
            self.seen["lapsed"] += 1

    def _drop_if_idle(self, host: str, state: _Host) -> None:
        """An idle host's state goes: the gate's memory follows the hosts in use, not every host of the build."""
        now = time.monotonic()
        if not state.leases and not state.waiters and state.next_at < now and state.backoff_until < now:
            self.hosts.pop(host, None)

    async def acquire(self, host: str, patience: float, hold_s: float) -> tuple[int | None, float, float]:
        """Wait up to `patience` s for one of the host's slots: (lease, seconds until the request may start,
        seconds of backoff among them), or (None, 0, 0) when none freed in time. The start is reserved here, after
        the host's backoff and 1/rate after the one before, so callers anywhere are spaced; the lease lapses
        `hold_s` after that start. Give it back with `release`."""
        state = self._host(host)
        state.waiters += 1
        try:
            async with state.freed:
                deadline = time.monotonic() + max(0.0, patience)
                while True:
                    now = time.monotonic()
                    self._lapse(state, now)
                    if len(state.leases) < self.concurrency:
                        break
                    if now >= deadline:
                        self.seen["busy"] += 1
                        return None, 0.0, 0.0
                    try:  # woken by a release; at least every second, for leases that lapse
                        await asyncio.wait_for(state.freed.wait(), min(deadline - now, 1.0))
                    except asyncio.TimeoutError:
                        pass
                start = max(now, state.next_at, state.backoff_until)
                state.next_at = start + (1.0 / self.rate if self.rate > 0 else 0.0)
                lease = next(self.ids)
                state.leases[lease] = start + hold_s
                self.seen["requests"] += 1
                self.seen["peak_in_flight"] = max(self.seen["peak_in_flight"], len(state.leases))
                return lease, start - now, max(0.0, state.backoff_until - now)
        finally:
            state.waiters -= 1
            self._drop_if_idle(host, state)

    async def release(self, host: str, lease: int) -> None:
        state = self.hosts.get(host)
        if state is None or state.leases.pop(lease, None) is None:
            return  # lapsed already (or its gate restarted since)
        async with state.freed:
            state.freed.notify()
        self._drop_if_idle(host, state)

    async def backoff(self, host: str, seconds: float) -> None:
        """A task saw a 429/503 (or a Retry-After): the host waits `seconds` for every task."""
        state = self._host(host)
        state.backoff_until = max(state.backoff_until, time.monotonic() + seconds)

    async def stats(self) -> dict[str, Any]:
        """What it saw, and the CPU seconds its process has used (benchmarks/url_fetch.py counts them)."""
        return {**self.seen, "cpu_s": time.process_time()}


def start(concurrency: int, rate: float, gates: int | None = None) -> tuple[str, ...]:
    """Start a build's gates on the connected Ray (named, owned by this driver: they end with it); their names.
    `gates`: how many (default: GATES, or one per CPUS_PER_GATE of the cluster's CPUs when that is more)."""
    import ray

    if gates is None:
        gates = max(GATES, int(ray.cluster_resources().get("CPU", 0)) // CPUS_PER_GATE)
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=10_000)(HostGate)
    run = uuid.uuid4().hex[:12]
    names = tuple(f"dcgan-host-gate-{run}-{i}" for i in range(gates))
    handles = []
    try:
        for name in names:
            handles.append(actor.options(name=name).remote(concurrency, rate))
        ray.get([h.stats.remote() for h in handles], timeout=CALL_MARGIN_S)  # started before any task asks
    except BaseException:
        for h in handles:
            ray.kill(h, no_restart=True)
        raise
    with _LOCK:
        _HANDLES.update(zip(names, handles))
    return names


def stop(names: tuple[str, ...]) -> dict[str, Any]:
    """End a build's gates; what they saw, summed (host states, requests, the most in flight on one host, callers
    that gave up waiting for a slot, leases that lapsed unreturned)."""
    import ray

    total: dict[str, Any] = {"hosts": 0, "requests": 0, "peak_in_flight": 0, "busy": 0, "lapsed": 0}
    handles = [_handle(name) for name in names]
    refs = [h.stats.remote() for h in handles]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
    for ref in ready:
        try:
            seen = ray.get(ref)
        except Exception:  # noqa: BLE001 - its figures are for the log; the build's result does not depend on them
            continue
        total = {k: (max if k == "peak_in_flight" else sum)((total[k], seen[k])) for k in total}
    for name, handle in zip(names, handles):
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


def _call(names: tuple[str, ...], host: str, method: str, *args, timeout: float):
    import ray

    try:  # the lookup too: a gate that cannot be found is the same fault as one that does not answer
        return ray.get(getattr(_gate_of(names, host), method).remote(host, *args), timeout=timeout)
    except Exception as err:  # noqa: BLE001 - an unreachable gate: the chunk is retried, no URL is lost
        raise TransientError(f"per-host gate unreachable ({type(err).__name__}: {err})"[:300]) from None


def acquire(names: tuple[str, ...], host: str, patience: float, hold_s: float) -> tuple[int | None, float, float]:
    """`HostGate.acquire` on the host's gate; raises TransientError if the gate does not answer (a lease it granted
    meanwhile lapses by itself)."""
    return _call(names, host, "acquire", patience, hold_s, timeout=patience + CALL_MARGIN_S)


def release(names: tuple[str, ...], host: str, lease: int) -> None:
    """Give a lease back, without waiting for the answer (the request is done; a release that is lost only keeps
    the slot until the lease lapses)."""
    try:
        _gate_of(names, host).release.remote(host, lease)
    except Exception as err:  # noqa: BLE001 - as above
        log.warning("%s: per-host gate unreachable (%s: %s)", host, type(err).__name__, err)


def backoff(names: tuple[str, ...], host: str, seconds: float) -> None:
    _call(names, host, "backoff", seconds, timeout=CALL_MARGIN_S)
