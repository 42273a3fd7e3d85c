"""dom0's agent as packaged: its own sockets, app.sock from systemd.

dom0's agent runs as its own user, not in group qubes, so it cannot give
app.sock to dom0's users itself: systemd creates the socket
(qubes-gpu-share-dom0-agent.socket, group qubes, 0660) and passes it
(LISTEN_FDS/LISTEN_PID); the agent serves on it as on its own, still
checking each peer. Applications find it by default in dom0. The units
themselves are checked in tests/test_packaging.py.
"""

import asyncio
import os
import pathlib
import socket
import stat

import pytest

from qubes_gpu_share import client
from qubes_gpu_share.agent import main
from qubes_gpu_share.agent.appserver import AppServer, PeerPolicy


def listening_socket(path: pathlib.Path, kind=socket.SOCK_SEQPACKET,
                     listen=True) -> socket.socket:
    """What systemd makes of ListenSequentialPacket= (SocketMode=0660)."""
    sock = socket.socket(socket.AF_UNIX, kind)
    sock.bind(str(path))
    os.chmod(path, 0o660)
    if listen:
        sock.listen(4)
    return sock


def activation(sock: socket.socket, pid: int = 4242, count: str = "1"):
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": count,
           "LISTEN_FDNAMES": "qubes-gpu-share-dom0-agent.socket",
           "OTHER": "kept"}
    return env, main.activated_socket(env, pid=4242, first_fd=sock.fileno())


def test_the_socket_systemd_passed_is_taken_and_the_variables_removed(
        tmp_path):
    sock = listening_socket(tmp_path / "app.sock")
    env, taken = activation(sock)
    sock.detach()                      # `taken` owns the fd now
    with taken:
        assert taken.getsockname() == str(tmp_path / "app.sock")
        assert not taken.get_inheritable()   # not passed on to children
    assert env == {"OTHER": "kept"}


def test_variables_meant_for_another_process_are_ignored(tmp_path):
    with listening_socket(tmp_path / "app.sock") as sock:
        env, taken = activation(sock, pid=1)
        assert taken is None and env == {"OTHER": "kept"}
    assert main.activated_socket({}, pid=4242) is None


@pytest.mark.parametrize("kind, listen, count", [
    (socket.SOCK_STREAM, True, "1"),       # ListenStream= by mistake
    (socket.SOCK_SEQPACKET, False, "1"),   # not listening
    (socket.SOCK_SEQPACKET, True, "2"),    # more than app.sock
])
def test_anything_but_one_listening_seqpacket_socket_is_refused(
        tmp_path, kind, listen, count):
    with listening_socket(tmp_path / "app.sock", kind, listen) as sock:
        with pytest.raises(ValueError, match="socket"):
            activation(sock, count=count)
        assert sock.fileno() >= 0          # left open: it is systemd's


class ListingAgent:
    """Just enough agent for a `list` request."""

    notify_app = None

    async def list(self):
        return ()

    async def connection_closed(self, _connection):
        pass


def test_app_server_serves_on_the_passed_socket_and_leaves_its_file(
        tmp_path):
    path = tmp_path / "app.sock"
    sock = listening_socket(path)

    async def scenario():
        server = AppServer(ListingAgent(), path, PeerPolicy(), None, sock)
        await server.start()
        try:
            def ask():
                with client.Client(str(path)) as agent:
                    return agent.list()
            return await asyncio.to_thread(ask)
        finally:
            await server.close()

    assert asyncio.run(scenario()) == []
    # systemd's file: neither replaced nor removed
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert stat.S_ISSOCK(path.stat().st_mode)


def test_dom0_agent_sockets_by_default():
    dom0 = main.build_parser().parse_args(["--dom0"])
    assert main.service_socket(dom0) == (
        pathlib.Path("/run/qubes-gpu-share-dom0/service.sock"), 0o660)
    assert dom0.broker_socket == "/run/qubes-gpu-share/dom0-agent.sock"
    qube = main.build_parser().parse_args([])
    assert main.service_socket(qube) == (
        pathlib.Path("/run/qubes-gpu-share/agent.sock"), 0o600)


def test_app_group_the_agent_is_not_in_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 990)
    monkeypatch.setattr(os, "getegid", lambda: 990)
    monkeypatch.setattr(os, "getgroups", lambda: [990, 44])
    main.check_can_own(None, None)
    main.check_can_own(44, "render")
    with pytest.raises(ValueError, match="qubes-gpu-share-dom0-agent.socket"):
        main.check_can_own(1000, "qubes")


def test_applications_find_dom0_agent_in_dom0(tmp_path, monkeypatch):
    monkeypatch.delenv(client.ENV_SOCKET, raising=False)
    proc = tmp_path / "proc"
    (proc / "xen").mkdir(parents=True)
    assert client.default_socket(str(proc)) == client.APP_SOCKET
    (proc / "xen" / "capabilities").write_text("control_d\n")
    assert client.default_socket(str(proc)) == client.DOM0_APP_SOCKET
    monkeypatch.setenv(client.ENV_SOCKET, "/elsewhere/app.sock")
    assert client.default_socket(str(proc)) == "/elsewhere/app.sock"
