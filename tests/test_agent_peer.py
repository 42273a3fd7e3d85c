"""Who may use the agent's application socket (SO_PEERCRED policy)."""

import grp
import os
import pwd

from qubes_gpu_share.agent.appserver import PeerPolicy

USER_UID, USER_GID, QUBES_GID, OTHER_UID = 1000, 1000, 98, 1001


def fake_accounts(monkeypatch):
    """A qube's accounts: `user` (uid 1000, primary group `user`) is a
    supplementary member of `qubes`, as Qubes sets it up."""
    users = {USER_UID: "user", OTHER_UID: "other"}
    groups = {QUBES_GID: ["user"]}

    def getpwuid(uid):
        if uid not in users:
            raise KeyError(uid)
        return pwd.struct_passwd((users[uid], "x", uid, uid, "", "/", "/bin/sh"))

    def getgrgid(gid):
        if gid not in groups:
            raise KeyError(gid)
        return grp.struct_group(("qubes", "x", gid, groups[gid]))

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(grp, "getgrgid", getgrgid)


def test_root_and_the_agent_itself_are_allowed():
    policy = PeerPolicy()
    assert policy.allows(0, 0)
    assert policy.allows(os.geteuid(), os.getegid())


def test_a_supplementary_member_of_the_app_group_is_allowed(monkeypatch):
    fake_accounts(monkeypatch)
    policy = PeerPolicy(gids=frozenset({QUBES_GID}))
    assert policy.allows(USER_UID, USER_GID)      # only via /etc/group
    assert not policy.allows(OTHER_UID, OTHER_UID)
    assert not policy.allows(4242, 4242)          # no such user


def test_primary_group_and_named_users(monkeypatch):
    fake_accounts(monkeypatch)
    assert PeerPolicy(gids=frozenset({QUBES_GID})).allows(OTHER_UID, QUBES_GID)
    assert PeerPolicy(uids=frozenset({OTHER_UID})).allows(OTHER_UID, OTHER_UID)
    assert not PeerPolicy().allows(OTHER_UID, OTHER_UID)
