"""The admin socket: what ``qvm-gpu-share`` asks the broker, as JSON.

One request per connection: a JSON object on one line (at most
:data:`MAX_REQUEST` bytes), answered by one JSON object and EOF:
``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``.
The socket is the gate (mode 0660, group qubes, like qubesd's): anyone who
may connect is a dom0 admin. The admin CLI talks to the broker, never to
the database behind its back, so a revoke follows the same safe order.

Requests: ``list`` (filters ``qube``, ``state``, ``all``), ``show`` (``id``,
with history), ``revoke`` (``id`` or ``qube``; ``wait``: seconds, then the
leases as they are), ``budgets``, ``settings``
(``qube``), ``stats`` (what the daemon costs; ``reset``).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from .. import limits
from ..lease import Lease, State
from ..names import InvalidName, parse_lease_id, parse_qube_name
from ..qrexec import stream
from ..qubes.facts import QubesFactsError
from ..registry import UnknownLease
from ..unixserver import UnixServer
from .core import Broker
from .lag import LagMonitor

log = logging.getLogger(__name__)
MAX_REQUEST = 4096
#: How long a revoke waits for its leases to end before it answers with
#: them as they are (an agent that does not answer delays the admin no
#: longer; the ending goes on), by default and at most.
REVOKE_WAIT = 5.0
REVOKE_WAIT_MAX = 60.0


class AdminError(Exception):
    """A request the admin API refuses; one line."""


def lease_json(lease: Lease, waiting: str | None = None,
               held_pages: int = 0) -> dict[str, Any]:
    """A lease for the admin; ``waiting``: why it has not ended yet;
    ``held_pages``: pages its consumer still maps, by the provider."""
    return {"id": lease.id, "waiting": waiting, "held_pages": held_pages,
            "consumer": lease.consumer,
            "provider": lease.provider, "state": lease.state.value,
            "pages": lease.pages, "mode": lease.mode.value,
            "initiator": lease.initiator.value, "fourcc": lease.meta.fourcc,
            "width": lease.meta.width, "height": lease.meta.height,
            "consumer_domid": lease.consumer_domid,
            "provider_domid": lease.provider_domid,
            "created": lease.created, "deadline": lease.deadline,
            "reason": lease.reason}


class AdminApi:
    """The admin requests over a :class:`Broker`."""

    def __init__(self, broker: Broker, lag: LagMonitor | None = None):
        self.broker = broker
        self.registry = broker.registry
        self._lag = lag

    async def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or \
                not isinstance(request.get("op"), str):
            raise AdminError('a request is {"op": NAME, ...}')
        method = getattr(self, "op_" + request["op"], None)
        if method is None:
            raise AdminError(f"unknown request {request['op'][:20]!r}")
        args = {k: v for k, v in request.items() if k != "op"}
        # what the admin reads is on disk: changes still waiting for a
        # commit (broker/core.py, durable points) are written first
        await self.broker.commits.flush()
        try:
            return await method(**args)
        except TypeError:
            raise AdminError(f"bad arguments for {request['op']}") from None

    async def op_list(self, qube: str | None = None,
                      state: str | None = None, all: bool = False):
        # pylint: disable=redefined-builtin
        leases = self.registry.leases(
            state=_state(state) if state else None,
            live_only=not all and state is None)
        if qube is not None:
            qube = _qube(qube)
            leases = [l for l in leases if qube in (l.consumer, l.provider)]
        return {"leases": [self._json(l) for l in leases]}

    async def op_show(self, id: str):  # pylint: disable=redefined-builtin
        lease = self._get(id)
        return {"lease": self._json(lease), "history": [
            {"time": e.time, "from": e.old_state.value if e.old_state
             else None, "to": e.new_state.value, "reason": e.reason}
            for e in self.registry.history(lease.id)]}

    async def op_revoke(self, id: str | None = None,
                        qube: str | None = None,
                        wait: float | int = REVOKE_WAIT):
        # pylint: disable=redefined-builtin
        if (id is None) == (qube is None):
            raise AdminError("revoke takes a lease id or a qube")
        if not isinstance(wait, (int, float)) or isinstance(wait, bool) \
                or not 0 <= wait <= REVOKE_WAIT_MAX:
            raise AdminError(f"wait is 0 to {REVOKE_WAIT_MAX:g} seconds")
        if id is not None:
            lease = self._get(id)
            log.info("admin revokes lease %s (%s -> %s)", lease.id,
                     lease.provider, lease.consumer)
            ids = [lease.id]
        else:
            qube = _qube(qube)
            log.info("admin revokes every lease of %s", qube)
            ids = [lease.id for lease in self.registry.live_of_qube(qube)]
        leases = await self.broker.revoke_within(ids, "revoked by admin",
                                                 wait)
        await self.broker.commits.flush()
        return {"leases": [self._json(l) for l in leases]}

    async def op_budgets(self):
        live = self.registry.leases(live_only=True)
        held: dict[tuple[str, str], int] = {}
        for lease in live:
            for side in (("consumer", lease.consumer),
                         ("provider", lease.provider)):
                held[side] = held.get(side, 0) + \
                    self.broker.held.get(lease.id, 0)
        qubes = sorted({l.provider for l in live} | {l.consumer for l in live}
                       | set(self._with_service()))
        providers, consumers = [], []
        for name in qubes:
            features = await self._features(name)
            try:
                plim = limits.provider_limits(features)
                clim = limits.consumer_limits(features)
            except limits.SettingError as exc:
                providers.append({"qube": name, "error": str(exc)})
                continue
            used = self.registry.provider_pages(name)
            providers.append({"qube": name, "pages_used": used,
                              "budget_pages": plim.budget_pages,
                              "pages_left": plim.budget_pages - used,
                              "held_pages": held.get(("provider", name),
                                                     0)})
            count, pages = self.registry.consumer_usage(name)
            offered, offered_pages, _ = self.registry.consumer_share(name,
                                                                     "")
            consumers.append({"qube": name, "leases": count - offered,
                              "quota_leases": clim.quota_leases,
                              "pages": pages - offered_pages,
                              "quota_pages": clim.quota_pages,
                              "offered_leases": offered,
                              "offer_quota_leases": clim.offer_quota_leases,
                              "offered_pages": offered_pages,
                              "offer_quota_pages": clim.offer_quota_pages,
                              "held_pages": held.get(("consumer", name),
                                                     0)})
        return {"providers": providers, "consumers": consumers}

    async def op_stats(self, reset: bool = False):
        """What the daemon costs: commits, qubesd calls, calls to qubes in
        flight, the event loop's lag (with --lag-monitor); ``reset``
        starts the lag's samples anew (benchmarks)."""
        answer = {"commits": self.broker.commits.commits,
                  "qubesd_calls": getattr(self.broker.facts, "calls", None),
                  "agent_calls_pending": dict(self.broker.agents.pending),
                  "loop_lag": self._lag.summary() if self._lag else None}
        if reset and self._lag is not None:
            self._lag.reset()
        return answer

    async def op_settings(self, qube: str):
        features = await self._features(_qube(qube), must_exist=True)
        settings = [{"feature": s.feature, "where": s.where,
                     "value": features.get(s.feature), "default": s.default,
                     "doc": s.doc} for s in limits.INT_SETTINGS]
        for name in limits.FEATURES[len(limits.INT_SETTINGS):]:
            settings.append({"feature": name, "value": features.get(name),
                             "default": None})
        return {"qube": qube, "settings": settings}

    def _json(self, lease: Lease) -> dict[str, Any]:
        waiting = self.broker.retries.waiting(lease.id) or \
            self.broker.asking.get(lease.id)
        return lease_json(lease, waiting,
                          self.broker.held.get(lease.id, 0))

    def _get(self, untrusted_id: Any) -> Lease:
        try:
            return self.registry.get(parse_lease_id(str(untrusted_id)))
        except (InvalidName, UnknownLease):
            raise AdminError(f"no lease {str(untrusted_id)[:40]}") from None

    async def _features(self, name: str, must_exist: bool = False):
        try:
            info = await self.broker.facts.describe(name)
        except QubesFactsError as exc:
            raise AdminError(str(exc)) from None
        if info is None and must_exist:
            raise AdminError(f"no such qube {name}")
        return dict(info.features) if info else {}

    def _with_service(self) -> list[str]:
        """Qubes the model can enumerate (none for qubesadmin here)."""
        return []


def _qube(untrusted: Any) -> str:
    try:
        return parse_qube_name(str(untrusted))
    except InvalidName as exc:
        raise AdminError(str(exc)) from None


def _state(untrusted: Any) -> State:
    try:
        return State(untrusted)
    except ValueError:
        raise AdminError(f"unknown state {str(untrusted)[:20]!r}; one of "
                         + ", ".join(s.value for s in State)) from None


class AdminServer(UnixServer):
    """Serves :class:`AdminApi` on a Unix socket (mode 0660, group qubes)."""

    def __init__(self, path: str, api: AdminApi, *, mode: int = 0o660,
                 group: int | None = None):
        super().__init__(path, self._serve, mode=mode, group=group)
        self.api = api

    async def _serve(self, reader, writer) -> None:
        try:
            untrusted = await stream.read_message(reader, MAX_REQUEST)
            answer = {"ok": True, **await self.api.handle(
                json.loads(untrusted.decode("ascii")))}
        except (stream.StreamError, ValueError, AdminError) as exc:
            answer = {"ok": False, "error": str(exc).splitlines()[0][:200]
                      if str(exc) else "error"}
        writer.write(json.dumps(answer).encode() + b"\n")
        try:
            await writer.drain()
        finally:
            writer.close()
