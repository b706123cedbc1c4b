"""The grpc.aio API against a live service ($USER_SERVICE_ADDR)."""

from __future__ import annotations

import contextlib
import uuid

import grpc
import grpc.aio
import pytest
import pytest_asyncio
from google.protobuf import duration_pb2
from fakes import AioRecorder
from support import TIMEOUT, unique_email

import userservice_client as usc
from userservice_client.user.v1 import projection_pb2, user_pb2

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def aio_channel(addr):
    # One channel per test: a grpc.aio channel belongs to the event loop it was made in.
    async with usc.connect_aio(addr) as ch:
        yield ch


async def test_aio_create_then_get_with_position(aio_channel):
    users = usc.UserServiceStub(aio_channel)
    email = unique_email("aio")
    created = await users.CreateUser(
        user_pb2.CreateUserRequest(name="Katherine Johnson", email=email), timeout=TIMEOUT
    )
    assert created.user.id > 0
    assert created.user.email == email

    got = await users.GetUser(
        user_pb2.GetUserRequest(id=created.user.id, min_position=created.position), timeout=TIMEOUT
    )
    assert got.user == created.user


async def test_aio_watch_progress(aio_channel, partitions):
    progress = usc.ProjectionServiceStub(aio_channel)
    interval = duration_pb2.Duration()
    interval.FromMilliseconds(200)
    call = progress.WatchProgress(
        projection_pb2.WatchProgressRequest(interval=interval), timeout=TIMEOUT
    )
    snapshots = []
    async for resp in call:
        assert len(resp.snapshot.partitions) == partitions
        snapshots.append(resp.snapshot)
        if len(snapshots) == 3:
            break
    assert len(snapshots) == 3
    assert call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED


async def test_aio_invalid_argument_with_details(aio_channel):
    users = usc.UserServiceStub(aio_channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await users.CreateUser(user_pb2.CreateUserRequest(name="", email="nope"), timeout=TIMEOUT)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in usc.field_violations(err)] == ["name", "email"]


async def test_aio_create_without_request_id_gets_one_and_its_replay_is_the_same_user(addr):
    rec = AioRecorder()
    async with usc.connect_aio(addr, interceptors=[rec]) as ch:
        users = usc.UserServiceStub(ch)
        email = unique_email("mary-aio")
        bare = user_pb2.CreateUserRequest(name="Mary Jackson", email=email)
        first = await users.CreateUser(bare, timeout=TIMEOUT)
        assert bare.request_id == ""
        chosen = rec.requests[-1].request_id
        assert uuid.UUID(chosen).version == 4

        replay = await users.CreateUser(
            user_pb2.CreateUserRequest(name="Mary Jackson", email=email, request_id=chosen), timeout=TIMEOUT
        )
        assert rec.requests[-1].request_id == chosen
        assert replay.user == first.user
        assert replay.position == first.position

        other = await users.CreateUser(
            user_pb2.CreateUserRequest(name="Mary Jackson", email=unique_email("mary-aio")), timeout=TIMEOUT
        )
        assert rec.requests[-1].request_id not in ("", chosen)
        assert other.user.id != first.user.id


async def test_aio_balanced_channel_on_the_live_service(addr):
    async with usc.connect_aio(f"dns:///{addr}", balanced=True) as ch:
        users = usc.UserServiceStub(ch)
        created = await users.CreateUser(
            user_pb2.CreateUserRequest(name="Dorothy Vaughan", email=unique_email(), request_id=usc.new_request_id()),
            timeout=TIMEOUT,
        )
        got = await users.GetUser(
            user_pb2.GetUserRequest(id=created.user.id, min_position=created.position), timeout=TIMEOUT
        )
        assert got.user == created.user


async def test_aio_watch_progress_helper_on_the_live_service(aio_channel, partitions):
    interval = duration_pb2.Duration()
    interval.FromMilliseconds(200)
    times = []
    async with contextlib.aclosing(
        usc.watch_progress_aio(aio_channel, projection_pb2.WatchProgressRequest(interval=interval))
    ) as snapshots:
        async for snapshot in snapshots:
            assert len(snapshot.partitions) == partitions
            times.append(snapshot.time.ToNanoseconds())
            if len(times) == 4:
                break
    assert times == sorted(set(times)), times
