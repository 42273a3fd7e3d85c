"""Every qvm-feature this service reads: names, defaults, bounds (pure).

The admin configures qubes-gpu-share the Qubes way, with ``qvm-features`` and
``qvm-service``; this module is the one place that knows those names, what
they default to and which values are legal. docs/decisions.md explains the
numbers; the comments below say where each comes from.

Features are strings. A value is parsed strictly (ASCII digits, no sign, no
leading zero, no blanks): absence means the default, garbage is an error
(:class:`SettingError`), never a silent fallback. The decision core turns
that error into a refusal naming the feature, so a typo in a limit fails
closed and visibly instead of quietly granting more than the admin meant.

Which qube holds which setting follows whose resource it protects:

* the provider's grant table: ``gpu-share-budget-pages``,
  ``gpu-share-max-lease-pages``, ``gpu-share-max-ttl``,
  ``gpu-share-default-ttl``, and how much of it one consumer may hold,
  ``gpu-share-pair-pages`` (default half the budget) or per consumer
  ``gpu-share-pair-pages.CONSUMER`` (on the provider qube);
* what one consumer takes: ``gpu-share-quota-pages``,
  ``gpu-share-quota-leases`` for the leases it asks for, and
  ``gpu-share-offer-quota-pages``, ``gpu-share-offer-quota-leases`` for
  those offered to it (on the consumer qube): a provider offering without
  end cannot use up the quota of the consumer's own requests;
* system-wide choices: ``gpu-share-dom0`` and
  ``gpu-share-allowed-modifiers`` (on dom0).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from . import uint
from .formats import MAX_LEASE_PAGES, MOD_LINEAR

#: qvm-service names; ``qvm-service QUBE NAME on`` stores feature
#: ``service.NAME`` = '1' and the qube sees /run/qubes-service/NAME.
SERVICE_CONSUMER = "gpu-share"
SERVICE_PROVIDER = "gpu-share-provider"
SERVICE_FEATURE_PREFIX = "service."

# Xen's grant-table facts (DESIGN.md "Hard facts"): v1 entries are 8 bytes,
# 512 per 4 KiB frame; the default max_grant_frames is 64.
GRANTS_PER_FRAME = 512
XEN_DEFAULT_GRANT_PAGES = 64 * GRANTS_PER_FRAME       # 32,768 (128 MiB)
#: What a qube's own disk and network front-ends may hold of its table.
FRONTEND_GRANT_PAGES = 9_500
#: Qubes raises max_grant_frames to 2048: 1,048,576 entries (4 GiB).
QUBES_GRANT_PAGES = 2048 * GRANTS_PER_FRAME
#: Mapping side: maptrack, default 1024 frames x 256 entries (1 GiB).
XEN_DEFAULT_MAPTRACK = 1024 * 256
#: One 3840x2160 XRGB8888 frame: 3840 * 2160 * 4 bytes / 4096.
UHD_XRGB_PAGES = 8_100


class SettingError(ValueError):
    """A feature holds a value this service cannot accept (one-line reason)."""


@dataclasses.dataclass(frozen=True)
class IntSetting:
    """An integer qvm-feature with its default and inclusive bounds."""

    feature: str
    default: int
    minimum: int
    maximum: int
    #: which qube carries it: "provider", "consumer" or "dom0"
    where: str
    doc: str

    def parse(self, features: Mapping[str, str]) -> int:
        """The value in ``features``, the default when absent; strict."""
        if self.feature not in features:
            return self.default
        value = parse_uint(features[self.feature], self.feature)
        if not self.minimum <= value <= self.maximum:
            raise SettingError(
                f"feature {self.feature}={value} is outside "
                f"{self.minimum}..{self.maximum}")
        return value


def parse_uint(untrusted_value: str, feature: str) -> int:
    """Decimal digits only: no sign, no blanks, no leading zeros."""
    value = uint.parse_uint(untrusted_value)
    if value is None:
        raise SettingError(
            f"feature {feature}={str(untrusted_value)[:40]!r} is not a "
            f"plain decimal integer")
    return value


# Provider: keep the lease pages well clear of the front-ends. Under stock
# Xen (32,768 entries) a budget of 16,384 leaves 16,384 for the front-ends'
# ~9,500, i.e. ~70% headroom, and still fits two UHD frames. On Qubes (1 M
# entries) the admin can raise it; the bound keeps the same 16,384 free.
BUDGET_PAGES = IntSetting(
    "gpu-share-budget-pages", default=XEN_DEFAULT_GRANT_PAGES // 2,
    minimum=1, maximum=QUBES_GRANT_PAGES - XEN_DEFAULT_GRANT_PAGES // 2,
    where="provider",
    doc="pages all live leases of this provider may hold together")
# One lease: a UHD XRGB8888 frame (8,100 pages) fits in 8,192 (32 MiB); the
# kernel keeps a dma-buf's grant count in 16 bits, hence the hard maximum.
MAX_LEASE = IntSetting(
    "gpu-share-max-lease-pages", default=8_192, minimum=1,
    maximum=MAX_LEASE_PAGES, where="provider",
    doc="pages one lease of this provider may have")
MAX_TTL = IntSetting(
    "gpu-share-max-ttl", default=3_600, minimum=1, maximum=7 * 86_400,
    where="provider",
    doc="seconds a lease may live at most; longer requests are clamped")
DEFAULT_TTL = IntSetting(
    "gpu-share-default-ttl", default=600, minimum=1, maximum=7 * 86_400,
    where="provider",
    doc="seconds a lease lives when the request names no TTL "
        "(clamped to gpu-share-max-ttl)")
# Consumer: what one consumer may hold from all providers together. 16,384
# pages is two UHD frames (double buffering); 16 leases covers a few
# surfaces triple-buffered. Bounded by the mapping side's maptrack.
QUOTA_PAGES = IntSetting(
    "gpu-share-quota-pages", default=XEN_DEFAULT_GRANT_PAGES // 2,
    minimum=1, maximum=XEN_DEFAULT_MAPTRACK, where="consumer",
    doc="pages all live leases of this consumer may hold together")
QUOTA_LEASES = IntSetting(
    "gpu-share-quota-leases", default=16, minimum=1, maximum=1_024,
    where="consumer", doc="live leases this consumer may hold")
# Offers are counted apart: they arrive without the consumer's applications
# asking, so a provider offering without end must not fill the quota of the
# consumer's own requests; the same sizes, for the same reasons.
OFFER_QUOTA_PAGES = IntSetting(
    "gpu-share-offer-quota-pages", default=XEN_DEFAULT_GRANT_PAGES // 2,
    minimum=1, maximum=XEN_DEFAULT_MAPTRACK, where="consumer",
    doc="pages all live leases offered to this consumer may hold together")
OFFER_QUOTA_LEASES = IntSetting(
    "gpu-share-offer-quota-leases", default=16, minimum=1, maximum=1_024,
    where="consumer", doc="live leases offered to this consumer")
# Fair share: with the defaults one consumer may hold at most half of a
# provider's budget (8,192 pages: a UHD frame), so a second consumer always
# fits; 0 means "half the budget" and follows a raised budget. The admin
# sets it per consumer with gpu-share-pair-pages.CONSUMER on the provider
# (qubesd accepts dots in feature names; a qube name is at most 31 chars).
PAIR_PAGES = IntSetting(
    "gpu-share-pair-pages", default=0, minimum=0,
    maximum=QUBES_GRANT_PAGES, where="provider",
    doc="pages one consumer may hold from this provider (0: half the "
        "budget); per consumer: gpu-share-pair-pages.CONSUMER")
PAIR_PAGES_PREFIX = PAIR_PAGES.feature + "."

#: On dom0: '1' lets dom0 take part (off by default; DESIGN.md "Roles").
DOM0_OPT_IN = "gpu-share-dom0"
#: On dom0: space-separated DRM format modifiers (0x + hex) allowed besides
#: LINEAR. Empty by default: a tiled layout is only safe once vetted.
ALLOWED_MODIFIERS = "gpu-share-allowed-modifiers"

INT_SETTINGS = (BUDGET_PAGES, MAX_LEASE, MAX_TTL, DEFAULT_TTL, PAIR_PAGES,
                QUOTA_PAGES, QUOTA_LEASES, OFFER_QUOTA_PAGES,
                OFFER_QUOTA_LEASES)
#: Every feature name this service reads, for docs and the admin CLI.
FEATURES = tuple(s.feature for s in INT_SETTINGS) + (
    DOM0_OPT_IN, ALLOWED_MODIFIERS,
    SERVICE_FEATURE_PREFIX + SERVICE_CONSUMER,
    SERVICE_FEATURE_PREFIX + SERVICE_PROVIDER)


@dataclasses.dataclass(frozen=True)
class History:
    """How much of the past the registry keeps: ended leases (with their
    events) for ``seconds`` after they ended, and at most the ``leases``
    newest of them, whichever is smaller. The journal is the long-term
    audit trail; the registry keeps what ``qvm-gpu-share show`` needs for
    recent leases, and must not grow with every lease a qube ever made.
    At about 1 KiB per ended lease and its events, 10,000 is ~10 MiB.
    Changed with the broker's --history-days / --history-leases."""

    seconds: float = 7 * 86_400
    leases: int = 10_000


@dataclasses.dataclass(frozen=True)
class ProviderLimits:
    """What protects one provider's grant table."""

    budget_pages: int
    max_lease_pages: int
    max_ttl: int
    default_ttl: int
    #: what one consumer may hold (PAIR_PAGES resolved), and per consumer
    pair_pages: int = 0
    pair_overrides: Mapping[str, int] = dataclasses.field(
        default_factory=dict)

    def pair_cap(self, consumer: str) -> int:
        """Pages ``consumer`` may hold from this provider."""
        return self.pair_overrides.get(consumer, self.pair_pages)


@dataclasses.dataclass(frozen=True)
class ConsumerLimits:
    """One consumer's share: of its own requests, and of offers to it."""

    quota_pages: int
    quota_leases: int
    offer_quota_pages: int = OFFER_QUOTA_PAGES.default
    offer_quota_leases: int = OFFER_QUOTA_LEASES.default


@dataclasses.dataclass(frozen=True)
class GlobalSettings:
    """System-wide choices, kept as features on dom0."""

    dom0_allowed: bool = False
    allowed_modifiers: frozenset[int] = frozenset({MOD_LINEAR})


def provider_limits(features: Mapping[str, str]) -> ProviderLimits:
    """Limits from a provider qube's features (raises SettingError)."""
    budget = BUDGET_PAGES.parse(features)
    return ProviderLimits(
        budget_pages=budget,
        max_lease_pages=MAX_LEASE.parse(features),
        max_ttl=MAX_TTL.parse(features),
        default_ttl=DEFAULT_TTL.parse(features),
        pair_pages=PAIR_PAGES.parse(features) or budget // 2,
        pair_overrides=_pair_overrides(features))


def _pair_overrides(features: Mapping[str, str]) -> dict[str, int]:
    overrides = {}
    for key in features:
        if key.startswith(PAIR_PAGES_PREFIX):
            consumer = key[len(PAIR_PAGES_PREFIX):]
            setting = dataclasses.replace(PAIR_PAGES, feature=key, minimum=1)
            overrides[consumer] = setting.parse(features)
    return overrides


def consumer_limits(features: Mapping[str, str]) -> ConsumerLimits:
    """Quota from a consumer qube's features (raises SettingError)."""
    return ConsumerLimits(quota_pages=QUOTA_PAGES.parse(features),
                          quota_leases=QUOTA_LEASES.parse(features),
                          offer_quota_pages=OFFER_QUOTA_PAGES.parse(features),
                          offer_quota_leases=OFFER_QUOTA_LEASES.parse(features))


def global_settings(dom0_features: Mapping[str, str]) -> GlobalSettings:
    """Settings from dom0's features (raises SettingError)."""
    return GlobalSettings(
        dom0_allowed=parse_flag(dom0_features, DOM0_OPT_IN),
        allowed_modifiers=parse_modifiers(
            dom0_features.get(ALLOWED_MODIFIERS, "")))


def parse_flag(features: Mapping[str, str], feature: str) -> bool:
    """Qubes' boolean feature: '1' on; absent, '' or '0' off."""
    value = features.get(feature, "")
    if value not in ("", "0", "1"):
        raise SettingError(
            f"feature {feature}={value[:40]!r} must be '1' or '' (or unset)")
    return value == "1"


_MODIFIER = re.compile(r"0x[0-9a-f]{1,16}")
_MAX_MODIFIERS = 32


def parse_modifiers(value: str) -> frozenset[int]:
    """LINEAR plus the 64-bit hex modifiers listed, separated by spaces."""
    words = value.split(" ") if value else []
    if len(words) > _MAX_MODIFIERS or \
            not all(_MODIFIER.fullmatch(w) for w in words):
        raise SettingError(
            f"feature {ALLOWED_MODIFIERS}={value[:60]!r} must be up to "
            f"{_MAX_MODIFIERS} modifiers like 0x100000000000001, one space "
            f"apart")
    return frozenset({MOD_LINEAR} | {int(w, 16) for w in words})


def enabled_services(features: Mapping[str, str]) -> frozenset[str]:
    """The qube's services ``qvm-service`` turned on (feature value '1')."""
    n = len(SERVICE_FEATURE_PREFIX)
    return frozenset(key[n:] for key, value in features.items()
                     if key.startswith(SERVICE_FEATURE_PREFIX)
                     and value == "1")
