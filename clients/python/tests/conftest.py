"""Shared fixtures. The tests need a live service at $USER_SERVICE_ADDR:

    scripts/with-service clients/python/run-tests
"""

from __future__ import annotations

import os

import pytest
from support import TIMEOUT

import userservice_client as usc
from userservice_client.user.v1 import projection_pb2


def pytest_sessionstart(session: pytest.Session) -> None:
    if not os.environ.get(usc.ADDR_ENV):
        # Not a skip: a run that tested nothing must not look green.
        raise pytest.UsageError(
            f"${usc.ADDR_ENV} is not set: these tests need a live user-service. "
            "Run them as `scripts/with-service clients/python/run-tests` from the repo root, "
            f"or set {usc.ADDR_ENV}=host:port of a running service."
        )


@pytest.fixture(scope="session")
def addr() -> str:
    return os.environ[usc.ADDR_ENV]


@pytest.fixture(scope="session")
def channel(addr: str):
    with usc.connect(addr) as ch:
        yield ch


@pytest.fixture(scope="session")
def users(channel) -> usc.UserServiceStub:
    return usc.UserServiceStub(channel)


@pytest.fixture(scope="session")
def progress(channel) -> usc.ProjectionServiceStub:
    return usc.ProjectionServiceStub(channel)


@pytest.fixture(scope="session")
def health(channel) -> usc.HealthStub:
    return usc.HealthStub(channel)



@pytest.fixture(scope="session")
def partitions(progress) -> int:
    """The partition count of the service's topic, as the service reads it
    from Kafka's metadata (a GetProgress snapshot's partitions, 0..n-1)."""
    snapshot = progress.GetProgress(projection_pb2.GetProgressRequest(), timeout=TIMEOUT).snapshot
    got = [p.partition for p in snapshot.partitions]
    assert got and got == list(range(len(got))), f"the topic's partitions are not 0..n-1: {got}"
    return len(got)
