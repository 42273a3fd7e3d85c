"""The decision core: one test (at least) per rule, and its purity."""

import dataclasses
import subprocess
import sys

import pytest

from qubes_gpu_share.decide import (Grant, Reason, Refusal, Request, Usage,
                                    decide)
from qubes_gpu_share.formats import ReceiveMode
from qubes_gpu_share.lease import Initiator
from qubes_gpu_share.qubeinfo import POWER_RULES, PowerState, QubeInfo

RUNNING, HALTED = PowerState.RUNNING, PowerState.HALTED

CONSUMER = QubeInfo("work", "AppVM", RUNNING, 7, "pvh",
                    {"service.gpu-share": "1"})
PROVIDER = QubeInfo("sys-gpu", "AppVM", RUNNING, 3, "hvm",
                    {"service.gpu-share-provider": "1"})
DOM0 = QubeInfo("dom0", "AdminVM", RUNNING, 0, "pv",
                {"service.gpu-share": "1",
                 "service.gpu-share-provider": "1"})
OPT_IN = {"gpu-share-dom0": "1"}


def lease(**kw):
    base = dict(caller="work", kind=Initiator.LEASE, consumer="work",
                provider="sys-gpu", pages=100, mode=ReceiveMode.CPU)
    base.update(kw)
    return Request(**base)


def run(request=None, consumer=CONSUMER, provider=PROVIDER, usage=Usage(),
        dom0=None):
    return decide(request or lease(), consumer, provider, usage, dom0 or {})


def reason(result):
    assert isinstance(result, Refusal), result
    assert "\n" not in result.message and result.message
    return result.reason


def feat(info, **features):
    merged = dict(info.features)
    merged.update({k.replace("_", "-"): v for k, v in features.items()})
    return dataclasses.replace(info, features=merged)


def test_grant_with_defaults():
    assert run() == Grant(ttl=600, pages=100, mode=ReceiveMode.CPU,
                          consumer_xid=7, provider_xid=3)


def test_offer_comes_from_provider():
    offer = lease(caller="sys-gpu", kind=Initiator.OFFER)
    assert isinstance(run(offer), Grant)
    assert reason(run(lease(caller="work", kind=Initiator.OFFER))) \
        is Reason.WRONG_CALLER


def test_lease_comes_from_consumer():
    assert reason(run(lease(caller="sys-gpu"))) is Reason.WRONG_CALLER
    assert reason(run(lease(caller="other"))) is Reason.WRONG_CALLER


def test_same_qube():
    req = lease(provider="work")
    assert reason(run(req, provider=CONSUMER)) is Reason.SAME_QUBE


@pytest.mark.parametrize("side", ["consumer", "provider"])
def test_both_must_exist(side):
    assert reason(run(**{side: None})) is Reason.NO_SUCH_QUBE


@pytest.mark.parametrize("side", ["consumer", "provider"])
def test_both_must_run(side):
    info = CONSUMER if side == "consumer" else PROVIDER
    halted = dataclasses.replace(info, power=HALTED, xid=-1)
    assert reason(run(**{side: halted})) is Reason.NOT_RUNNING


def test_dom0_consumer_needs_opt_in():
    req = lease(caller="dom0", consumer="dom0")
    assert reason(run(req, consumer=DOM0)) is Reason.DOM0_NOT_ALLOWED
    assert reason(run(req, consumer=DOM0,
                      dom0={"gpu-share-dom0": "0"})) is Reason.DOM0_NOT_ALLOWED
    assert isinstance(run(req, consumer=DOM0, dom0=OPT_IN), Grant)


def test_dom0_provider_needs_opt_in():
    req = lease(provider="dom0")
    assert reason(run(req, provider=DOM0)) is Reason.DOM0_NOT_ALLOWED
    assert run(req, provider=DOM0, dom0=OPT_IN).provider_xid == 0


def test_dom0_consumer_only_cpu_even_if_reported_otherwise():
    # dom0 is PV whatever a virt_mode value says (the AdminVM has none)
    odd_dom0 = dataclasses.replace(DOM0, virt_mode="pvh")
    req = lease(caller="dom0", consumer="dom0", mode=ReceiveMode.DMABUF)
    assert reason(run(req, consumer=odd_dom0, dom0=OPT_IN)) \
        is Reason.MODE_UNSUPPORTED


def test_bad_dom0_setting_refuses():
    assert reason(run(dom0={"gpu-share-dom0": "yes"})) is Reason.BAD_SETTING


def test_consumer_needs_service():
    off = feat(CONSUMER, **{"service.gpu-share": ""})
    assert reason(run(consumer=off)) is Reason.SERVICE_DISABLED


def test_provider_needs_provider_service():
    # the consumer service on the provider is not enough
    wrong = QubeInfo("sys-gpu", "AppVM", RUNNING, 3, "hvm",
                     {"service.gpu-share": "1"})
    assert reason(run(provider=wrong)) is Reason.SERVICE_DISABLED


def test_dmabuf_refused_for_pv_consumer():
    pv = dataclasses.replace(CONSUMER, virt_mode="pv")
    assert reason(run(lease(mode=ReceiveMode.DMABUF), consumer=pv)) \
        is Reason.MODE_UNSUPPORTED
    assert isinstance(run(lease(mode=ReceiveMode.CPU), consumer=pv), Grant)


@pytest.mark.parametrize("virt_mode", ["pvh", "hvm"])
def test_dmabuf_allowed_for_pvh_hvm(virt_mode):
    info = dataclasses.replace(CONSUMER, virt_mode=virt_mode)
    assert run(lease(mode=ReceiveMode.DMABUF), consumer=info).mode is ReceiveMode.DMABUF


def test_modifier_linear_unless_allowed():
    tiled = lease(modifier=0x100000000000001)
    assert reason(run(tiled)) is Reason.MODIFIER_NOT_ALLOWED
    allowed = {"gpu-share-allowed-modifiers": "0x100000000000001"}
    assert isinstance(run(tiled, dom0=allowed), Grant)


def test_per_lease_cap():
    assert isinstance(run(lease(pages=8_192)), Grant)
    assert reason(run(lease(pages=8_193))) is Reason.TOO_LARGE
    small = feat(PROVIDER, gpu_share_max_lease_pages="10")
    assert reason(run(provider=small)) is Reason.TOO_LARGE


def test_consumer_lease_quota():
    assert isinstance(run(usage=Usage(consumer_leases=15)), Grant)
    assert reason(run(usage=Usage(consumer_leases=16))) is Reason.QUOTA_LEASES
    one = feat(CONSUMER, gpu_share_quota_leases="1")
    assert reason(run(consumer=one, usage=Usage(consumer_leases=1))) \
        is Reason.QUOTA_LEASES


def test_consumer_page_quota():
    assert isinstance(run(usage=Usage(consumer_pages=16_284)), Grant)
    assert reason(run(usage=Usage(consumer_pages=16_285))) \
        is Reason.QUOTA_PAGES


def test_pair_share():
    """One consumer takes at most its share of one provider (default half
    the budget), whichever way the leases came."""
    assert isinstance(run(usage=Usage(pair_pages=8_092)), Grant)
    refused = run(usage=Usage(pair_pages=8_093))
    assert reason(refused) is Reason.PAIR_SHARE
    assert "share of 8192" in refused.message
    offer = lease(caller="sys-gpu", kind=Initiator.OFFER)
    assert reason(run(offer, usage=Usage(pair_pages=8_093))) \
        is Reason.PAIR_SHARE
    more = feat(PROVIDER, **{"gpu_share_pair_pages.work": "9000"})
    assert isinstance(run(provider=more, usage=Usage(pair_pages=8_093)),
                      Grant)


def test_offers_count_against_their_own_quota():
    """Offers fill the consumer's offer quota, never the quota of its own
    requests, and the other way round."""
    offer = lease(caller="sys-gpu", kind=Initiator.OFFER)
    full_offers = Usage(offered_leases=16, offered_pages=1_000)
    assert isinstance(run(usage=full_offers), Grant)  # its own requests
    assert reason(run(offer, usage=full_offers)) is Reason.QUOTA_LEASES
    assert isinstance(run(offer, usage=Usage(consumer_leases=16)), Grant)
    assert reason(run(offer, usage=Usage(offered_pages=16_300))) \
        is Reason.QUOTA_PAGES


def test_provider_budget():
    assert isinstance(run(usage=Usage(provider_pages=16_284)), Grant)
    assert reason(run(usage=Usage(provider_pages=16_285))) is Reason.BUDGET
    big = feat(PROVIDER, gpu_share_budget_pages="100000")
    assert isinstance(run(provider=big, usage=Usage(provider_pages=16_285)),
                      Grant)


def test_bad_limit_feature_refuses_naming_it():
    bad = feat(PROVIDER, gpu_share_budget_pages="lots")
    result = run(provider=bad)
    assert reason(result) is Reason.BAD_SETTING
    assert "gpu-share-budget-pages" in result.message


def test_ttl_clamped_to_maximum():
    assert run(lease(ttl=10)).ttl == 10
    assert run(lease(ttl=10**6)).ttl == 3_600
    short = feat(PROVIDER, gpu_share_max_ttl="30")
    assert run(lease(ttl=60), provider=short).ttl == 30
    assert run(provider=short).ttl == 30  # default 600 clamped too


def test_first_failing_rule_wins():
    # a halted, service-less provider is reported as halted
    both = QubeInfo("sys-gpu", "AppVM", HALTED, -1, "hvm")
    assert reason(run(provider=both)) is Reason.NOT_RUNNING


@pytest.mark.parametrize("power", list(PowerState))
def test_only_a_running_qube_takes_a_new_lease(power):
    consumer = dataclasses.replace(CONSUMER, power=power)
    verdict = run(consumer=consumer)
    if power is RUNNING:
        assert isinstance(verdict, Grant)
    elif power is PowerState.UNKNOWN:  # unknown is not "halted"
        assert reason(verdict) is Reason.QUBES_UNAVAILABLE
        assert "NA" in verdict.message
    else:
        assert reason(verdict) is Reason.NOT_RUNNING
        assert power.value in verdict.message
    assert POWER_RULES[power].new_lease is (power is RUNNING)


def test_request_rejects_nonsense():
    with pytest.raises(ValueError):
        lease(pages=0)
    with pytest.raises(ValueError):
        lease(ttl=0)


def test_reason_codes_are_stable_strings():
    assert {r.value for r in Reason} >= {
        "wrong-caller", "same-qube", "no-such-qube", "not-running",
        "dom0-not-allowed", "service-disabled", "mode-unsupported",
        "too-large", "quota-leases", "quota-pages", "budget", "bad-setting"}
    assert str(Refusal(Reason.BUDGET, "x")) == "budget: x"


def test_pure_no_io_modules_loaded():
    code = ("import sys, qubes_gpu_share.decide; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-I", "-c", code],
                                check=True, capture_output=True,
                                text=True).stdout.split())
    io_modules = {"asyncio", "socket", "subprocess", "sqlite3", "select",
                  "selectors", "threading", "qubesadmin", "cffi", "json"}
    assert "qubes_gpu_share.decide" in loaded
    assert not loaded & io_modules
