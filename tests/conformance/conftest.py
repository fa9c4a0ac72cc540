"""The gateways the conformance tests share: real processes on free ports,
each in its own data dir, started once per test session when a test first asks
for one and stopped by PID at the end.

Each has the settings its rules need, small enough to reach the limits in a
few frames; tests use fresh user ids (kit.uid), so they do not see each other.
"""
import pytest

from conftest import start_gateway


def _gateway(tmp_path_factory, name: str, *args: str):
    gw = start_gateway(tmp_path_factory.mktemp(name), *args)
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def gw1(tmp_path_factory):
    """One worker: the durable log, the WebSocket listener, small limits."""
    yield from _gateway(tmp_path_factory, "conf-one", "--workers", "1", "--hello-timeout", "1",
                        "--max-devices", "3", "--max-group-members", "4", "--max-pending", "30")


@pytest.fixture(scope="session")
def gw2(tmp_path_factory):
    """Two workers: connections handed to their owner, SENDs forwarded; a worker
    killed comes back after 2 s (a window in which its users are UNAVAILABLE)."""
    yield from _gateway(tmp_path_factory, "conf-two", "--workers", "2", "--restart-backoff", "2")


@pytest.fixture(scope="session")
def gw_fast(tmp_path_factory):
    """Short deadlines and low rates: ping interval 200 ms and idle timeout 3
    intervals, 20 SENDs/s (bursts of 5) per session, 3 connections per source
    address, 8 connections in all."""
    yield from _gateway(tmp_path_factory, "conf-fast", "--workers", "1", "--ping-interval-ms", "200",
                        "--idle-timeout-pings", "3", "--msg-rate", "20", "--msg-burst", "5",
                        "--max-conns-per-ip", "3", "--max-connections", "8")
