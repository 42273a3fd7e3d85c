"""Admission control: may this lease be granted, and on what terms (pure).

qrexec policy has already allowed the call for the (caller, target) pair;
this is the broker's own check on top, from facts about both qubes, their
features and the current usage. One function, :func:`decide`, answers with
a :class:`Grant` or a :class:`Refusal`; the rules run in the order below and
the first that fails is the answer (docs/decisions.md lists them). No I/O:
the caller gathers the facts, this module only judges them.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping

from . import limits
from .formats import MOD_LINEAR, ReceiveMode
from .lease import Initiator
from .qubeinfo import PowerState, QubeInfo


class Reason(str, enum.Enum):
    """Stable refusal codes: logged, shown by the admin CLI, sent back."""

    WRONG_CALLER = "wrong-caller"
    SAME_QUBE = "same-qube"
    NO_SUCH_QUBE = "no-such-qube"
    NOT_RUNNING = "not-running"
    DOM0_NOT_ALLOWED = "dom0-not-allowed"
    SERVICE_DISABLED = "service-disabled"
    MODE_UNSUPPORTED = "mode-unsupported"
    MODIFIER_NOT_ALLOWED = "modifier-not-allowed"
    BAD_SETTING = "bad-setting"
    TOO_LARGE = "too-large"
    QUOTA_LEASES = "quota-leases"
    QUOTA_PAGES = "quota-pages"
    PAIR_SHARE = "pair-share"
    BUDGET = "budget"
    #: qubesd cannot tell (here: power state NA; in the broker: qubesd
    #: unreachable, or its events connection down)
    QUBES_UNAVAILABLE = "qubes-unavailable"


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated request: names are checked, numbers are in range.

    ``ttl`` None asks for the provider's default TTL.
    """

    caller: str
    kind: Initiator
    consumer: str
    provider: str
    pages: int
    mode: ReceiveMode
    ttl: int | None = None
    modifier: int = MOD_LINEAR

    def __post_init__(self) -> None:
        if self.pages < 1 or (self.ttl is not None and self.ttl < 1):
            raise ValueError("request pages and ttl must be positive")


@dataclasses.dataclass(frozen=True)
class Usage:
    """What is held now by live leases (from the registry): the consumer's
    own requests, the offers to it (counted apart), the provider's budget,
    and what this consumer holds of this provider."""

    consumer_leases: int = 0
    consumer_pages: int = 0
    provider_pages: int = 0
    offered_leases: int = 0
    offered_pages: int = 0
    pair_pages: int = 0


@dataclasses.dataclass(frozen=True)
class Grant:
    """Go ahead: charge ``pages`` to both, expire after ``ttl`` seconds.

    The domain ids are the ones the grants must name, recorded with the
    lease so a restarted qube (new xid) is never mistaken for the old one.
    """

    ttl: int
    pages: int
    mode: ReceiveMode
    consumer_xid: int
    provider_xid: int


@dataclasses.dataclass(frozen=True)
class Refusal:
    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


class _Refused(Exception):
    """Internal: carries the refusal out of the rule that found it."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.refusal = Refusal(reason, message)


def decide(request: Request, consumer: QubeInfo | None,
           provider: QubeInfo | None, usage: Usage,
           dom0_features: Mapping[str, str]) -> Grant | Refusal:
    """Judge ``request`` given both qubes (None: no such qube) and usage."""
    try:
        _check_parties(request, consumer, provider)
        assert consumer is not None and provider is not None
        settings = _settings(limits.global_settings, dom0_features, "dom0")
        _check_dom0(request, consumer, provider, settings)
        _check_services(consumer, provider)
        _check_mode(request, consumer, settings)
        return _admit(request, consumer, provider, usage)
    except _Refused as refused:
        return refused.refusal


def _check_parties(request: Request, consumer: QubeInfo | None,
                   provider: QubeInfo | None) -> None:
    caller_side = (request.consumer if request.kind is Initiator.LEASE
                   else request.provider)
    if request.caller != caller_side:
        role = "consumer" if request.kind is Initiator.LEASE else "provider"
        raise _Refused(Reason.WRONG_CALLER,
                       f"a {request.kind.value} must come from its {role} "
                       f"{caller_side}, not {request.caller}")
    if request.consumer == request.provider:
        raise _Refused(Reason.SAME_QUBE,
                       f"{request.consumer} cannot lease from itself")
    for role, name, info in (("consumer", request.consumer, consumer),
                             ("provider", request.provider, provider)):
        if info is None:
            raise _Refused(Reason.NO_SUCH_QUBE, f"no {role} qube {name}")
        if info.power is PowerState.UNKNOWN:
            raise _Refused(Reason.QUBES_UNAVAILABLE,
                           f"qubesd does not say whether {role} {name} "
                           f"runs (power state NA)")
        if not info.running:
            raise _Refused(Reason.NOT_RUNNING,
                           f"{role} {name} is not running (power state "
                           f"{info.power.value})")


def _check_dom0(request: Request, consumer: QubeInfo, provider: QubeInfo,
                settings: limits.GlobalSettings) -> None:
    if (consumer.is_dom0 or provider.is_dom0) and not settings.dom0_allowed:
        raise _Refused(Reason.DOM0_NOT_ALLOWED,
                       f"dom0 takes part only with feature "
                       f"{limits.DOM0_OPT_IN}=1 on dom0")


def _check_services(consumer: QubeInfo, provider: QubeInfo) -> None:
    for info, service in ((consumer, limits.SERVICE_CONSUMER),
                          (provider, limits.SERVICE_PROVIDER)):
        if service not in info.services:
            raise _Refused(Reason.SERVICE_DISABLED,
                           f"{info.name} does not have service {service} "
                           f"enabled (qvm-service {info.name} {service} on)")


def _check_mode(request: Request, consumer: QubeInfo,
                settings: limits.GlobalSettings) -> None:
    if request.mode is ReceiveMode.DMABUF and consumer.is_pv:
        raise _Refused(Reason.MODE_UNSUPPORTED,
                       f"{consumer.name} is PV: it cannot receive a dma-buf "
                       f"from grants, ask for cpu mode")
    if request.modifier not in settings.allowed_modifiers:
        raise _Refused(Reason.MODIFIER_NOT_ALLOWED,
                       f"modifier {request.modifier:#x} is not in dom0's "
                       f"{limits.ALLOWED_MODIFIERS}")


def _admit(request: Request, consumer: QubeInfo, provider: QubeInfo,
           usage: Usage) -> Grant:
    """Size, quota and budget; then the terms of the grant."""
    plim = _settings(limits.provider_limits, provider.features, provider.name)
    clim = _settings(limits.consumer_limits, consumer.features, consumer.name)
    pages = request.pages
    if pages > plim.max_lease_pages:
        raise _Refused(Reason.TOO_LARGE,
                       f"{pages} pages exceed {provider.name}'s per-lease "
                       f"cap of {plim.max_lease_pages}")
    _check_quota(request, consumer.name, clim, usage)
    pair_cap = plim.pair_cap(consumer.name)
    if usage.pair_pages + pages > pair_cap:
        raise _Refused(Reason.PAIR_SHARE,
                       f"{consumer.name} holds {usage.pair_pages} pages of "
                       f"{provider.name}'s; {pages} more exceed its share "
                       f"of {pair_cap}")
    if usage.provider_pages + pages > plim.budget_pages:
        raise _Refused(Reason.BUDGET,
                       f"{provider.name} grants {usage.provider_pages} pages; "
                       f"{pages} more exceed its budget of "
                       f"{plim.budget_pages}")
    ttl = plim.default_ttl if request.ttl is None else request.ttl
    return Grant(ttl=min(ttl, plim.max_ttl), pages=pages, mode=request.mode,
                 consumer_xid=consumer.xid, provider_xid=provider.xid)


def _check_quota(request: Request, consumer: str,
                 clim: limits.ConsumerLimits, usage: Usage) -> None:
    """The consumer's quota for its own requests, or for offers to it."""
    if request.kind is Initiator.LEASE:
        what, leases, pages = ("leases", usage.consumer_leases,
                               usage.consumer_pages)
        quota_leases, quota_pages = clim.quota_leases, clim.quota_pages
    else:
        what, leases, pages = ("offered leases", usage.offered_leases,
                               usage.offered_pages)
        quota_leases = clim.offer_quota_leases
        quota_pages = clim.offer_quota_pages
    if leases + 1 > quota_leases:
        raise _Refused(Reason.QUOTA_LEASES,
                       f"{consumer} already holds {leases} of "
                       f"{quota_leases} {what}")
    if pages + request.pages > quota_pages:
        raise _Refused(Reason.QUOTA_PAGES,
                       f"{consumer} holds {pages} pages of {what}; "
                       f"{request.pages} more exceed its quota of "
                       f"{quota_pages}")


def _settings(parse, features: Mapping[str, str], qube: str):
    """``parse(features)``, a bad value refused with the feature named."""
    try:
        return parse(features)
    except limits.SettingError as err:
        raise _Refused(Reason.BAD_SETTING, f"{qube}: {err}") from None
