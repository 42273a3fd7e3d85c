"""Facts about qubes from qubesd, through Qubes' own qubesadmin (dom0).

The only module of the package that imports qubesadmin: it exists only in
dom0 (python3-qubesadmin), so nothing else may need it to import. It gives
:class:`~.qubesd.QubesdFacts` its transport: qubesadmin's ``qubesd_call``
(one Admin API round trip, its errors turned into the seam's) and one
events connection of qubesadmin's ``EventsDispatcher`` at a time, whose
reconnection :mod:`.qubesd` does itself: qubesadmin's own loop does not
catch a connection that breaks in the middle of an event, and would not
tell anyone that events were missed.

Calls into qubes (the agents' services) run ``qrexec-client`` as an
asyncio subprocess (:class:`..qrexec.call.QrexecClientCaller`), the
program qubesadmin's ``run_service`` runs in dom0: no thread is held while
an agent takes its time, and the broker bounds the calls per qube.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import qubesadmin
import qubesadmin.app
import qubesadmin.config
import qubesadmin.events
import qubesadmin.exc

from ..oneline import one_line
from ..qrexec import call
from .facts import QubesFactsError, ServiceCallError
from ..qubeinfo import ServiceResult
from .qubesd import EventHandler, QubesdError, QubesdFacts, ServiceHandler

DispatcherFactory = Callable[..., qubesadmin.events.EventsDispatcher]


class AdminQubes(QubesdFacts):
    """Facts about qubes as qubesd tells them, for the dom0 broker."""

    def __init__(self, app: Any = None,
                 dispatcher_factory: DispatcherFactory =
                 qubesadmin.events.EventsDispatcher,
                 qrexec_client: str = qubesadmin.config.QREXEC_CLIENT,
                 service_handler: ServiceHandler | None = None):
        self.app = app if app is not None else qubesadmin.Qubes()
        self._dispatcher_factory = dispatcher_factory
        self._caller = call.QrexecClientCaller(qrexec_client)
        super().__init__(self._qubesd_call, self._listen,
                         service_handler=service_handler)

    @classmethod
    def over_socket(cls, path: str, **kwargs: Any) -> AdminQubes:
        """qubesadmin talking to a qubesd at ``path`` (the stand-in of the
        simulation and the benchmark; dom0's is qubesadmin's default)."""
        qubesadmin.config.QUBESD_SOCKET = path
        return cls(qubesadmin.app.QubesLocal(), **kwargs)

    def _qubesd_call(self, dest: str, method: str, arg: str | None) -> bytes:
        try:
            return self.app.qubesd_call(dest, method, arg)
        except qubesadmin.exc.QubesDaemonCommunicationError as err:
            # includes an empty answer (QubesDaemonAccessError): what it
            # means is decided by the caller, never "halted"
            raise QubesFactsError(
                f"qubesd, {method} for {dest}: {type(err).__name__}: "
                f"{_one_line(err)}") from None
        except qubesadmin.exc.QubesException as err:
            raise QubesdError(type(err).__name__,
                              f"{method} for {dest}: {_one_line(err)}") \
                from None
        except (OSError, ValueError) as err:
            raise QubesFactsError(f"qubesd, {method} for {dest}: "
                                  f"{_one_line(err)}") from None

    async def _listen(self, handler: EventHandler) -> None:
        """One events connection, until it ends (returns) or breaks
        (raises; qubesadmin's own loop does not reconnect here)."""
        dispatcher = self._dispatcher_factory(self.app, enable_cache=False)

        def relay(subject: Any, event: str, **kwargs: str) -> None:
            handler(None if subject is None else str(subject), event,
                    _strings(kwargs))
        dispatcher.add_handler("*", relay)
        await dispatcher.listen_for_events(reconnect=False)

    async def _call_service(self, qube: str, service: str, payload: bytes,
                            max_output: int) -> ServiceResult:
        if self._service_handler is not None:  # the simulated router
            return await super()._call_service(qube, service, payload,
                                               max_output)
        try:
            status, output = await self._caller.call_service(
                qube, service, payload, max_output)
        except call.QrexecCallError as exc:  # output too long included
            raise ServiceCallError(str(exc)) from None
        return ServiceResult(status, output)


def _strings(kwargs: Mapping[str, Any]) -> dict[str, str]:
    return {str(key): str(value) for key, value in kwargs.items()}


def _one_line(err: BaseException) -> str:
    return one_line(err, empty=type(err).__name__)
