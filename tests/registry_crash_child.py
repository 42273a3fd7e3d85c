"""Child process of tests/test_registry_crash.py, and the lease test factory.

Run as ``python registry_crash_child.py DB SEED``: performs random legal
lease state changes on the registry at DB forever (single changes and
batches), and after each commit *returned* writes one line per transition
to stdout: ``LEASE_ID OLD NEW`` (OLD is ``-`` for a creation). The parent
kills it with SIGKILL at a random moment and checks that every line it
received is in the database.

:func:`sample_lease` is also used by the other lease and registry tests.
"""

from __future__ import annotations

import random
import sys

from qubes_gpu_share import lease, names, registry
from qubes_gpu_share.formats import PAGE_SIZE, ReceiveMode, blob_layout
from qubes_gpu_share.lease import State

_QUBES = ("work", "personal", "sys-gpu", "sys-gui", "vault")


def sample_lease(*, consumer: str = "work", provider: str = "sys-gpu",
                 pages: int = 2, ttl: int = 60, now: float = 1000.0,
                 mode: str = "cpu", initiator: str = "lease") -> lease.Lease:
    """A valid lease in its initial state with a fresh random id."""
    meta = blob_layout(pages * PAGE_SIZE)
    return lease.new_lease(lease_id=names.new_lease_id(), consumer=consumer,
                           provider=provider, consumer_domid=3,
                           provider_domid=2, mode=ReceiveMode(mode),
                           initiator=lease.Initiator(initiator), meta=meta,
                           ttl=ttl, now=now)


def _random_change(rng: random.Random, live: dict[str, lease.Lease]
                   ) -> registry.Change:
    """Create a lease or move a live one along a random legal edge."""
    if not live or rng.random() < 0.3:
        consumer, provider = rng.sample(_QUBES, 2)
        return registry.Create(sample_lease(consumer=consumer,
                                            provider=provider,
                                            pages=rng.randint(1, 64)))
    current = live[rng.choice(sorted(live))]
    new = rng.choice(sorted(lease.TRANSITIONS[current.state]))
    refs = tuple(range(8, 8 + current.pages)) if new == State.ACTIVE else ()
    return registry.Transition(current.id, new, f"crash test {new.value}",
                               refs)


def _report(before: dict[str, lease.Lease], results: list[lease.Lease]) -> None:
    for result in results:
        old = before.get(result.id)
        old_state = old.state.value if old else "-"
        sys.stdout.write(f"{result.id} {old_state} {result.state.value}\n")
        before[result.id] = result
    sys.stdout.flush()


def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    with registry.Registry(path) as reg:
        live = {item.id: item for item in reg.leases(live_only=True)}
        while True:
            batch: list[registry.Change] = []
            planned = dict(live)
            for _ in range(rng.choice((1, 1, 1, 2, 5))):
                change = _random_change(rng, planned)
                batch.append(change)
                if isinstance(change, registry.Create):
                    planned[change.lease.id] = change.lease
                elif change.state in lease.LIVE:
                    planned[change.lease_id] = lease.advance(
                        planned[change.lease_id], change.state,
                        reason=change.reason, now=0.0, refs=change.refs)
                else:
                    del planned[change.lease_id]
            results = reg.apply(batch)
            # Only now, after the commit returned, is it reported.
            before = {item.id: item for item in live.values()}
            _report(before, results)
            live = {k: v for k, v in before.items() if v.live}


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
