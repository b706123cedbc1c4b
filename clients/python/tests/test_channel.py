"""The channels' defaults (retry policy, request ids, balancing, keepalive),
sync and grpc.aio, against in-process fake servers (tests/fakes.py): the live
service cannot be made to answer ABORTED, nor be two instances that count
their calls. The live counterparts are in test_sync.py and test_aio.py."""

from __future__ import annotations

import importlib.resources
import json
import time
import uuid
from pathlib import Path

import grpc
import grpc.aio
import pytest
from fakes import AioRecorder, FakeUsers, Recorder, serve
from support import TIMEOUT, unique_email

import userservice_client as usc
from userservice_client.user.v1 import user_pb2

#: The one source of the retry policy (clients/shared/README.md).
SHARED_CONFIG = Path(__file__).resolve().parents[2] / "shared" / "service_config.json"

A = grpc.StatusCode.ABORTED
U = grpc.StatusCode.UNAVAILABLE


def _create(name: str = "Fake") -> user_pb2.CreateUserRequest:
    return user_pb2.CreateUserRequest(name=name, email=unique_email("fake"))


def _assert_uuid4(s: str) -> None:
    assert uuid.UUID(s).version == 4, s


# --- the service config ------------------------------------------------------------


def test_service_config_is_the_shared_one():
    shipped = importlib.resources.files("userservice_client").joinpath("service_config.json").read_text()
    assert usc.SERVICE_CONFIG_JSON == shipped
    assert usc.SERVICE_CONFIG == json.loads(SHARED_CONFIG.read_text())
    assert usc.SERVICE_CONFIG_JSON == SHARED_CONFIG.read_text()
    # What the channel gets is that file, with retries on.
    opts = dict(usc.CHANNEL_OPTIONS)
    assert opts["grpc.service_config"] == SHARED_CONFIG.read_text()
    assert opts["grpc.enable_retries"] == 1
    # The policy the tests below rely on.
    create = next(m for m in usc.SERVICE_CONFIG["methodConfig"] if m["name"][0].get("method") == "CreateUser")
    assert create["retryPolicy"]["maxAttempts"] == 5
    assert set(create["retryPolicy"]["retryableStatusCodes"]) == {"UNAVAILABLE", "ABORTED"}


KEEPALIVE = {
    "grpc.keepalive_time_ms": 30000,
    "grpc.keepalive_timeout_ms": 10000,
    "grpc.keepalive_permit_without_calls": 0,
    "grpc.http2.max_pings_without_data": 0,
}


@pytest.fixture
def channel_options(monkeypatch):
    """The options connect() and connect_aio() give grpc's channel constructors."""
    seen = []
    real_sync, real_aio = grpc.insecure_channel, grpc.aio.insecure_channel

    def sync_channel(target, options=None, **kw):
        seen.append(("sync", target, dict(options)))
        return real_sync(target, options=options, **kw)

    def aio_channel(target, options=None, **kw):
        seen.append(("aio", target, dict(options)))
        return real_aio(target, options=options, **kw)

    monkeypatch.setattr(grpc, "insecure_channel", sync_channel)
    monkeypatch.setattr(grpc.aio, "insecure_channel", aio_channel)
    return seen


@pytest.mark.asyncio
async def test_channels_get_the_defaults(channel_options):
    usc.connect("127.0.0.1:1").close()
    await usc.connect_aio("127.0.0.1:1").close()
    usc.connect("dns:///h:1", balanced=True).close()
    await usc.connect_aio("dns:///h:1", balanced=True).close()
    usc.connect("127.0.0.1:1", options=[("grpc.keepalive_time_ms", 60000)]).close()
    assert [(api, target) for api, target, _ in channel_options] == [
        ("sync", "127.0.0.1:1"), ("aio", "127.0.0.1:1"), ("sync", "dns:///h:1"), ("aio", "dns:///h:1"),
        ("sync", "127.0.0.1:1"),
    ]
    for _, _, opts in channel_options[:4]:
        assert opts["grpc.service_config"] == SHARED_CONFIG.read_text()
        assert opts["grpc.enable_retries"] == 1
        assert {k: opts[k] for k in KEEPALIVE} == KEEPALIVE
    assert "grpc.lb_policy_name" not in channel_options[0][2]
    assert "grpc.lb_policy_name" not in channel_options[1][2]
    assert channel_options[2][2]["grpc.lb_policy_name"] == "round_robin"
    assert channel_options[3][2]["grpc.lb_policy_name"] == "round_robin"
    # The caller's option replaces the default of the same name.
    assert channel_options[4][2]["grpc.keepalive_time_ms"] == 60000


# --- retries and request ids: sync -----------------------------------------------------


def test_aborted_and_unavailable_are_retried_with_the_same_request_id():
    users = FakeUsers(fail_with=[A, U, A])
    rec = Recorder()
    with serve(users=users) as addr, usc.connect(addr, interceptors=[rec]) as ch:
        resp = usc.UserServiceStub(ch).CreateUser(_create(), timeout=TIMEOUT)
    assert resp.user.id == 4  # answered by the 4th attempt
    ids = users.request_ids()
    assert len(ids) == 4
    # The interceptor chose one id before the first attempt; every retry carries it.
    assert len(rec.requests) == 1
    assert ids == [rec.requests[0].request_id] * 4
    _assert_uuid4(ids[0])


def test_aborted_is_retried_up_to_max_attempts():
    users = FakeUsers(always=A)
    with serve(users=users) as addr, usc.connect(addr) as ch:
        with pytest.raises(grpc.RpcError) as info:
            usc.UserServiceStub(ch).CreateUser(_create(), timeout=TIMEOUT)
    assert info.value.code() == A
    assert users.calls == 5
    assert len(set(users.request_ids())) == 1


def test_invalid_argument_is_not_retried():
    users = FakeUsers(always=grpc.StatusCode.INVALID_ARGUMENT)
    with serve(users=users) as addr, usc.connect(addr) as ch:
        with pytest.raises(grpc.RpcError) as info:
            usc.UserServiceStub(ch).CreateUser(_create(), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert users.calls == 1


def test_caller_options_replace_the_defaults():
    users = FakeUsers(always=A)
    with serve(users=users) as addr, usc.connect(addr, options=[("grpc.enable_retries", 0)]) as ch:
        with pytest.raises(grpc.RpcError):
            usc.UserServiceStub(ch).CreateUser(_create(), timeout=TIMEOUT)
    assert users.calls == 1


def test_an_explicit_request_id_is_kept_and_the_callers_message_untouched():
    users = FakeUsers()
    with serve(users=users) as addr, usc.connect(addr) as ch:
        stub = usc.UserServiceStub(ch)
        mine = user_pb2.CreateUserRequest(name="Mine", email=unique_email(), request_id="mine-1")
        stub.CreateUser(mine, timeout=TIMEOUT)
        bare = _create()
        stub.CreateUser(bare, timeout=TIMEOUT)
        stub.CreateUser(bare, timeout=TIMEOUT)
    ids = users.request_ids()
    assert ids[0] == "mine-1"
    assert bare.request_id == ""  # filled on a copy
    # A fresh id per call: the same message sent twice is two requests.
    _assert_uuid4(ids[1])
    _assert_uuid4(ids[2])
    assert ids[1] != ids[2]


# --- retries and request ids: grpc.aio ----------------------------------------------------


@pytest.mark.asyncio
async def test_aio_aborted_and_unavailable_are_retried_with_the_same_request_id():
    users = FakeUsers(fail_with=[A, U, A])
    rec = AioRecorder()
    with serve(users=users) as addr:
        async with usc.connect_aio(addr, interceptors=[rec]) as ch:
            resp = await usc.UserServiceStub(ch).CreateUser(_create(), timeout=TIMEOUT)
    assert resp.user.id == 4
    ids = users.request_ids()
    assert len(rec.requests) == 1
    assert ids == [rec.requests[0].request_id] * 4
    _assert_uuid4(ids[0])


@pytest.mark.asyncio
async def test_aio_aborted_is_retried_and_invalid_argument_is_not():
    aborted = FakeUsers(always=A)
    invalid = FakeUsers(always=grpc.StatusCode.INVALID_ARGUMENT)
    with serve(users=aborted) as a_addr, serve(users=invalid) as i_addr:
        async with usc.connect_aio(a_addr) as a_ch, usc.connect_aio(i_addr) as i_ch:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await usc.UserServiceStub(a_ch).CreateUser(_create(), timeout=TIMEOUT)
            assert info.value.code() == A
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await usc.UserServiceStub(i_ch).CreateUser(_create(), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert aborted.calls == 5
    assert len(set(aborted.request_ids())) == 1
    assert invalid.calls == 1


@pytest.mark.asyncio
async def test_aio_an_explicit_request_id_is_kept_and_the_callers_message_untouched():
    users = FakeUsers()
    with serve(users=users) as addr:
        async with usc.connect_aio(addr) as ch:
            stub = usc.UserServiceStub(ch)
            await stub.CreateUser(
                user_pb2.CreateUserRequest(name="Mine", email=unique_email(), request_id="mine-1"),
                timeout=TIMEOUT,
            )
            bare = _create()
            await stub.CreateUser(bare, timeout=TIMEOUT)
            await stub.CreateUser(bare, timeout=TIMEOUT)
    ids = users.request_ids()
    assert ids[0] == "mine-1"
    assert bare.request_id == ""
    _assert_uuid4(ids[1])
    assert ids[1] != ids[2]


# --- balancing (two fake instances) ---------------------------------------------------------


def _split(a: FakeUsers, b: FakeUsers, call, warmup_s: float = 5.0, n: int = 20):
    """Calls until both instances got one (round_robin picks only among
    connected ones) or warmup_s passed, then n calls more; returns how those n
    split between a and b."""
    deadline = time.monotonic() + warmup_s
    while not (a.calls and b.calls) and time.monotonic() < deadline:
        call()
    a0, b0 = a.calls, b.calls
    for _ in range(n):
        call()
    return a.calls - a0, b.calls - b0


def test_balanced_spreads_calls_over_every_address():
    a, b = FakeUsers(), FakeUsers()
    with serve(users=a) as a_addr, serve(users=b) as b_addr:
        target = f"ipv4:{a_addr},{b_addr}"
        with usc.connect(target, balanced=True) as ch:
            stub = usc.UserServiceStub(ch)
            got = _split(a, b, lambda: stub.CreateUser(_create(), timeout=TIMEOUT))
        assert got[0] >= 5 and got[1] >= 5, got
        # Without it: pick_first, every call to one address.
        a0, b0 = a.calls, b.calls
        with usc.connect(target) as ch:
            stub = usc.UserServiceStub(ch)
            for _ in range(20):
                stub.CreateUser(_create(), timeout=TIMEOUT)
        assert sorted([a.calls - a0, b.calls - b0]) == [0, 20]


@pytest.mark.asyncio
async def test_aio_balanced_spreads_calls_over_every_address():
    a, b = FakeUsers(), FakeUsers()
    with serve(users=a) as a_addr, serve(users=b) as b_addr:
        target = f"ipv4:{a_addr},{b_addr}"
        async with usc.connect_aio(target, balanced=True) as ch:
            stub = usc.UserServiceStub(ch)
            deadline = time.monotonic() + 5.0
            while not (a.calls and b.calls) and time.monotonic() < deadline:
                await stub.CreateUser(_create(), timeout=TIMEOUT)
            a0, b0 = a.calls, b.calls
            for _ in range(20):
                await stub.CreateUser(_create(), timeout=TIMEOUT)
            got = (a.calls - a0, b.calls - b0)
        assert got[0] >= 5 and got[1] >= 5, got
        a0, b0 = a.calls, b.calls
        async with usc.connect_aio(target) as ch:
            stub = usc.UserServiceStub(ch)
            for _ in range(20):
                await stub.CreateUser(_create(), timeout=TIMEOUT)
        assert sorted([a.calls - a0, b.calls - b0]) == [0, 20]
