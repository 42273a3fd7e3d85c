"""Feature names, defaults, bounds and strict parsing (limits.py)."""

import pytest

from qubes_gpu_share import limits
from qubes_gpu_share.formats import MAX_LEASE_PAGES, MOD_LINEAR


def test_defaults_when_features_absent():
    prov = limits.provider_limits({})
    cons = limits.consumer_limits({})
    glob = limits.global_settings({})
    assert prov == limits.ProviderLimits(16_384, 8_192, 3_600, 600,
                                         pair_pages=8_192)
    assert cons == limits.ConsumerLimits(16_384, 16, 16_384, 16)
    assert glob.dom0_allowed is False
    assert glob.allowed_modifiers == {MOD_LINEAR}


def test_fair_share_by_default_and_per_pair():
    """One consumer holds at most half a provider's budget by default, so a
    second always fits; the admin changes it for all or one consumer."""
    prov = limits.provider_limits({})
    assert prov.pair_cap("work") * 2 == prov.budget_pages
    assert prov.pair_cap("work") >= limits.UHD_XRGB_PAGES
    raised = limits.provider_limits({"gpu-share-budget-pages": "40000"})
    assert raised.pair_cap("work") == 20_000  # follows the budget
    set_ = limits.provider_limits({"gpu-share-pair-pages": "100",
                                   "gpu-share-pair-pages.work": "16384"})
    assert (set_.pair_cap("work"), set_.pair_cap("mail")) == (16_384, 100)
    with pytest.raises(limits.SettingError,
                       match="gpu-share-pair-pages.work"):
        limits.provider_limits({"gpu-share-pair-pages.work": "0"})


def test_defaults_leave_headroom_in_xen_default_grant_table():
    # the budget plus what front-ends hold must fit the stock 64 frames
    assert (limits.BUDGET_PAGES.default + limits.FRONTEND_GRANT_PAGES
            < limits.XEN_DEFAULT_GRANT_PAGES)
    # ... and one UHD XRGB8888 frame fits one lease, two fit the budget
    assert limits.UHD_XRGB_PAGES * 4096 == 3840 * 2160 * 4
    assert 3840 * 2160 * 4 <= limits.MAX_LEASE.default * 4096
    assert 2 * limits.UHD_XRGB_PAGES <= limits.BUDGET_PAGES.default
    assert limits.MAX_LEASE.maximum == MAX_LEASE_PAGES
    assert limits.DEFAULT_TTL.default <= limits.MAX_TTL.default


def test_values_are_read():
    prov = limits.provider_limits({"gpu-share-budget-pages": "100000",
                                   "gpu-share-max-ttl": "60"})
    assert prov.budget_pages == 100_000 and prov.max_ttl == 60
    assert limits.consumer_limits(
        {"gpu-share-quota-leases": "1"}).quota_leases == 1


@pytest.mark.parametrize("value", [
    "", "-1", "+5", " 5", "5 ", "05", "1e3", "0x10", "5.0", "١٢", "lots",
    "9" * 25])
def test_garbage_integer_is_an_error(value):
    with pytest.raises(limits.SettingError, match="gpu-share-quota-pages"):
        limits.consumer_limits({"gpu-share-quota-pages": value})


@pytest.mark.parametrize("setting", limits.INT_SETTINGS,
                         ids=lambda s: s.feature)
def test_bounds_inclusive(setting):
    for ok in (setting.minimum, setting.maximum):
        assert setting.parse({setting.feature: str(ok)}) == ok
    for bad in (setting.minimum - 1, setting.maximum + 1):
        if bad >= 0:
            with pytest.raises(limits.SettingError, match="outside"):
                setting.parse({setting.feature: str(bad)})


def test_error_is_one_line():
    with pytest.raises(limits.SettingError) as err:
        limits.provider_limits({"gpu-share-budget-pages": "a\nb"})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value,allowed", [
    ("", False), ("0", False), ("1", True)])
def test_dom0_opt_in(value, allowed):
    assert limits.global_settings(
        {"gpu-share-dom0": value}).dom0_allowed is allowed


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_dom0_opt_in_garbage(value):
    with pytest.raises(limits.SettingError, match="gpu-share-dom0"):
        limits.global_settings({"gpu-share-dom0": value})


def test_modifiers():
    mods = limits.global_settings(
        {"gpu-share-allowed-modifiers": "0x100000000000001 0x2"})
    assert mods.allowed_modifiers == {MOD_LINEAR, 0x100000000000001, 0x2}


@pytest.mark.parametrize("value", [
    "0x", "1", "0X1", "0x1  0x2", " 0x1", "0x1,0x2", "0x" + "f" * 17,
    " ".join(["0x1"] * 33)])
def test_modifier_garbage(value):
    with pytest.raises(limits.SettingError):
        limits.parse_modifiers(value)


def test_enabled_services_only_value_1():
    feats = {"service.gpu-share": "1", "service.gpu-share-provider": "",
             "service.other": "0", "gpu-share": "1"}
    assert limits.enabled_services(feats) == {"gpu-share"}


def test_feature_names_listed_once():
    assert len(set(limits.FEATURES)) == len(limits.FEATURES)
    assert all(f.startswith(("gpu-share-", "service.gpu-share"))
               for f in limits.FEATURES)
