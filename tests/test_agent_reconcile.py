"""The consumer's agent ends leases dom0 holds active that nobody here knows.

The known gap of docs/reliability.md: the broker records a lease
``active`` and dies before its answer reaches the consumer's agent. These
tests make that happen at exactly that point over the simulated system:
qrexec picks ``qubes.GpuLease+PROVIDER`` before ``qubes.GpuLease`` in
dom0's service directory, so a socket of that name put there by the test
(:class:`Interceptor`) stands between the agent and broker.sock. It
forwards the call, reads the broker's whole answer (so the lease is
committed active), then SIGKILLs the broker and drops the answer, or holds
the answer back to keep a call in flight.

Every test ends with the providers' budgets consistent at their expected
value and zero simulator hazards (hostile_sim's witnesses).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from hostile_sim import (SMALL, SMALL_PAGES, app, assert_budgets_consistent,
                         consumer, final, memfd, provider, system)
from qubes_gpu_share import client
from qubes_gpu_share.lease import State
from qubes_gpu_share.names import DOM0

PROVIDERS = ["gpu-a", "gpu-b"]
QUBES = [provider("gpu-a", 2), provider("gpu-b", 3), consumer("work", 10)]
#: Far longer than any test: a lease that ends did not end by its TTL.
TTL = 600
#: Seconds within which a lost lease must be released once dom0 answers
#: again (the agent's retry backoff plus its delivery grace, with margin).
PROMPT = 5.0


class Interceptor:
    """One call to ``qubes.GpuLease+PROVIDER``, passed on to the broker;
    ``on_answer(answer)`` returns the bytes to hand the agent, or None to
    close the call without a byte. Serves once, then removes its socket
    (later calls reach broker.sock as usual)."""

    def __init__(self, sim, provider_name: str,
                 on_answer: Callable[[bytes], bytes | None]):
        self._sim = sim
        self._on_answer = on_answer
        self.path = (sim.layout.rpc_dir(DOM0)
                     / f"qubes.GpuLease+{provider_name}")
        self.answered = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        agent_side, _address = self._listener.accept()
        self._listener.close()
        os.unlink(self.path)
        with agent_side, socket.socket(socket.AF_UNIX) as broker:
            broker.connect(str(self._sim.layout.broker_socket()))
            broker.sendall(_read_all(agent_side))
            broker.shutdown(socket.SHUT_WR)
            answer = _read_all(broker)
            self.answered.set()
            forward = self._on_answer(answer)
            if forward is not None:
                agent_side.sendall(forward)

    def join(self) -> None:
        self._thread.join(30)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def kill_broker_and_drop(sim, *, committed: bool = True
                         ) -> Callable[[bytes], None]:
    """The broker dies after it sent the answer (and, with *committed*,
    after ``active`` reached the disk: it rides on the next commit, within
    the writer's linger); the answer never reaches the agent."""
    def on_answer(answer: bytes) -> None:
        assert answer.startswith(b"0\0"), answer
        if committed:
            sim.wait_until(lambda: [lease.state for lease in leases_between(
                sim, "work", "gpu-a")] == [State.ACTIVE], 5,
                "the answered lease was not committed active")
        sim.kill("broker")
    return on_answer


def restart_broker(sim) -> float:
    """Restart the broker killed by an interceptor (from this thread: a
    simulated process dies with the thread that started it)."""
    sim.wait_until(lambda: not sim.processes["broker"].running(), 10,
                   "the broker did not die")
    sim.start_broker()
    return time.monotonic()


def leases_between(sim, consumer_name: str, provider_name: str) -> list:
    return [lease for lease in sim.leases()
            if (lease.consumer, lease.provider) == (consumer_name,
                                                    provider_name)]


def lose_one_lease(sim, work: client.Client, *,
                   committed: bool = True) -> str:
    """work leases from gpu-a; the broker dies with the answer. Returns
    the lease id only the registry knows."""
    interceptor = Interceptor(sim, "gpu-a",
                              kill_broker_and_drop(sim, committed=committed))
    with pytest.raises(client.ClientError) as refused:
        work.lease("gpu-a", **SMALL, ttl=TTL)
    assert refused.value.code == "qrexec"
    interceptor.join()
    (lost,) = leases_between(sim, "work", "gpu-a")
    assert lost.state is (State.ACTIVE if committed else State.EXPORTING)
    return lost.id


def wait_final(sim, lease_id: str, timeout: float) -> float:
    """Seconds until *lease_id* reached a final state (TimeoutError if it
    did not within *timeout*)."""
    started = time.monotonic()
    sim.wait_until(lambda: final(state_of(sim, lease_id)), timeout,
                   f"lease {lease_id} did not end", interval=0.05)
    return time.monotonic() - started


def state_of(sim, lease_id: str):
    return next(lease for lease in sim.leases() if lease.id == lease_id)


def test_lost_answer_released_soon_offer_untaken_survives(tmp_path):
    with system(tmp_path, QUBES) as sim, app(sim, "work") as work, \
            app(sim, "gpu-b") as offerer:
        fd = memfd()
        try:
            offered = offerer.offer("work", fd, **SMALL, ttl=TTL)
        finally:
            os.close(fd)
        lost = lose_one_lease(sim, work)
        assert sim.provider_pages("gpu-a") == SMALL_PAGES  # broker down
        restart_broker(sim)
        seconds = wait_final(sim, lost, PROMPT)
        print(f"lost lease released {seconds:.2f} s after the restart")
        assert state_of(sim, lost).state is State.RELEASED
        # the delivered offer nobody took yet is known: it stays, and work
        # can still take it
        assert state_of(sim, offered).state is State.ACTIVE
        assert_budgets_consistent(sim, PROVIDERS,
                                  {"gpu-a": 0, "gpu-b": SMALL_PAGES})
        with work.incoming(timeout=5) as taken:
            assert taken.lease == offered
        offerer.release(offered)
        wait_final(sim, offered, PROMPT)
        assert_budgets_consistent(sim, PROVIDERS, {"gpu-a": 0, "gpu-b": 0})


def test_an_answer_sent_before_active_was_durable_ends_at_restart(tmp_path):
    """The answer leaves before ``active`` is on disk (it rides on the next
    commit); the broker dies in between: the restarted broker finds the
    lease in flight and ends it in the safe order (the consumer is asked
    first though no refs are on record: it may have got them)."""
    with system(tmp_path, QUBES) as sim, app(sim, "work") as work:
        lost = lose_one_lease(sim, work, committed=False)
        restart_broker(sim)
        wait_final(sim, lost, PROMPT)
        # on record its export never completed: it ends failed
        assert state_of(sim, lost).state is State.FAILED
        assert_budgets_consistent(sim, PROVIDERS, {"gpu-a": 0, "gpu-b": 0})


def test_lease_in_flight_is_not_released(tmp_path):
    """A lease of gpu-b whose answer is still on its way (held back) while
    the agent reconciles after losing a gpu-a lease: the gpu-a one is
    released, the gpu-b one reaches its application and stays."""
    release_answer = threading.Event()

    def hold(answer: bytes) -> bytes:
        release_answer.wait(60)
        return answer

    with system(tmp_path, QUBES) as sim, app(sim, "work") as work, \
            app(sim, "work") as slow_app:
        held = Interceptor(sim, "gpu-b", hold)
        got: list = []
        slow = threading.Thread(target=lambda: got.append(
            slow_app.lease("gpu-b", **SMALL, ttl=TTL)))
        slow.start()
        assert held.answered.wait(10)
        (in_flight,) = leases_between(sim, "work", "gpu-b")
        lost = lose_one_lease(sim, work)
        restart_broker(sim)
        wait_final(sim, lost, PROMPT)
        # the reconcile listed both: the unknown gpu-b lease is still active
        assert state_of(sim, in_flight.id).state is State.ACTIVE
        release_answer.set()
        slow.join(10)
        held.join()
        (buffer,) = got
        assert buffer.lease == in_flight.id
        time.sleep(1.5)  # a round that wrongly released it would by now
        assert state_of(sim, in_flight.id).state is State.ACTIVE
        assert_budgets_consistent(sim, PROVIDERS,
                                  {"gpu-a": 0, "gpu-b": SMALL_PAGES})
        buffer.close()
        wait_final(sim, in_flight.id, PROMPT)
        assert_budgets_consistent(sim, PROVIDERS, {"gpu-a": 0, "gpu-b": 0})


def test_agent_restart_releases_the_leases_it_held(tmp_path):
    with system(tmp_path, QUBES) as sim:
        with app(sim, "work") as work:
            held = [work.lease(name, **SMALL, ttl=TTL) for name in PROVIDERS]
            sim.kill("agent-work")
            for buffer in held:     # its connection died: let go
                buffer.close(release=False)
        assert {state_of(sim, buffer.lease).state
                for buffer in held} == {State.ACTIVE}
        sim.start_agent("work")
        for buffer in held:
            wait_final(sim, buffer.lease, PROMPT)
            assert state_of(sim, buffer.lease).state is State.RELEASED
        assert_budgets_consistent(sim, PROVIDERS, {"gpu-a": 0, "gpu-b": 0})
