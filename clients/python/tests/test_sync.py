"""The sync API against a live service ($USER_SERVICE_ADDR)."""

from __future__ import annotations

import os
import pickle
import time
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from fakes import Recorder
from support import TIMEOUT, random_id, unique_email

import userservice_client as usc
from userservice_client.user.v1 import projection_pb2, user_pb2

def _ms(n: int) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromMilliseconds(n)
    return d


def _error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# --- the generated package itself -------------------------------------------


def test_generated_code_is_a_proper_subpackage():
    # The messages belong to the package's modules (pickling, repr), while the
    # descriptor pool keeps the proto file names the server's reflection uses.
    assert user_pb2.User.__module__ == "userservice_client.user.v1.user_pb2"
    assert user_pb2.DESCRIPTOR.name == "user/v1/user.proto"
    assert projection_pb2.DESCRIPTOR.name == "user/v1/projection.proto"
    u = user_pb2.User(id=7, name="Ada", email="ada@example.com")
    assert pickle.loads(pickle.dumps(u)) == u


# --- UserService ---------------------------------------------------------------


def test_create_then_get_with_position(users, partitions):
    email = unique_email("ada")
    created = users.CreateUser(
        user_pb2.CreateUserRequest(name="  Ada Lovelace  ", email=email), timeout=TIMEOUT
    )
    assert created.user.id > 0
    assert created.user.name == "Ada Lovelace"  # surrounding spaces trimmed
    assert created.user.email == email
    assert created.user.HasField("create_time")
    assert 0 <= created.position.partition < partitions
    assert created.position.offset >= 0

    got = users.GetUser(
        user_pb2.GetUserRequest(id=created.user.id, min_position=created.position), timeout=TIMEOUT
    )
    assert got.user == created.user


def test_get_unknown_user_is_not_found(users):
    err = _error(lambda: users.GetUser(user_pb2.GetUserRequest(id=random_id()), timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_invalid_argument_carries_bad_request_field_violations(users):
    err = _error(
        lambda: users.CreateUser(user_pb2.CreateUserRequest(name="", email="nope"), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    status = usc.rich_status(err)
    assert status is not None
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == err.details()

    violations = usc.field_violations(err)
    assert [field for field, _ in violations] == ["name", "email"]
    assert all(description for _, description in violations)


def test_reused_client_chosen_id_is_already_exists(users):
    uid = random_id()
    created = users.CreateUser(
        user_pb2.CreateUserRequest(id=uid, name="First", email=unique_email()), timeout=TIMEOUT
    )
    assert created.user.id == uid

    err = _error(
        lambda: users.CreateUser(
            user_pb2.CreateUserRequest(id=uid, name="Second", email=unique_email()), timeout=TIMEOUT
        )
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    # The first one stays.
    got = users.GetUser(
        user_pb2.GetUserRequest(id=uid, min_position=created.position), timeout=TIMEOUT
    )
    assert got.user.name == "First"


def test_retry_with_request_id_is_idempotent(users):
    req = user_pb2.CreateUserRequest(
        name="Grace Hopper", email=unique_email("grace"), request_id=f"py-{uuid.uuid4()}"
    )
    first = users.CreateUser(req, timeout=TIMEOUT)
    again = users.CreateUser(req, timeout=TIMEOUT)
    assert again.user == first.user
    assert again.position == first.position

    # The same key with other fields is refused.
    other = user_pb2.CreateUserRequest()
    other.CopyFrom(req)
    other.email = unique_email("other")
    err = _error(lambda: users.CreateUser(other, timeout=TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in usc.field_violations(err)] == ["request_id"]


def test_create_without_request_id_gets_one_and_its_replay_is_the_same_user(addr):
    rec = Recorder()  # runs after the client's interceptor: sees the id it chose
    with usc.connect(addr, interceptors=[rec]) as ch:
        users = usc.UserServiceStub(ch)
        email = unique_email("mary")
        bare = user_pb2.CreateUserRequest(name="Mary Jackson", email=email)
        first = users.CreateUser(bare, timeout=TIMEOUT)
        assert bare.request_id == ""  # the caller's message is left alone
        chosen = rec.requests[-1].request_id
        assert uuid.UUID(chosen).version == 4

        # What a retry of that call sends: the same fields, the same id.
        replay = users.CreateUser(
            user_pb2.CreateUserRequest(name="Mary Jackson", email=email, request_id=chosen), timeout=TIMEOUT
        )
        assert rec.requests[-1].request_id == chosen
        assert replay.user == first.user
        assert replay.position == first.position

        # Another call without one gets another id: another user.
        other = users.CreateUser(
            user_pb2.CreateUserRequest(name="Mary Jackson", email=unique_email("mary")), timeout=TIMEOUT
        )
        assert rec.requests[-1].request_id not in ("", chosen)
        assert other.user.id != first.user.id


def test_balanced_channel_on_the_live_service(addr):
    with usc.connect(f"dns:///{addr}", balanced=True) as ch:
        users = usc.UserServiceStub(ch)
        created = users.CreateUser(
            user_pb2.CreateUserRequest(name="Dorothy Vaughan", email=unique_email(), request_id=usc.new_request_id()),
            timeout=TIMEOUT,
        )
        got = users.GetUser(
            user_pb2.GetUserRequest(id=created.user.id, min_position=created.position), timeout=TIMEOUT
        )
        assert got.user == created.user


def test_get_at_a_position_past_the_log_end_is_out_of_range(users):
    created = users.CreateUser(
        user_pb2.CreateUserRequest(name="Waiter", email=unique_email()), timeout=TIMEOUT
    )
    far = user_pb2.Position(partition=created.position.partition, offset=10**12)
    # No wait could see it applied: refused at once, whatever the deadline.
    err = _error(
        lambda: users.GetUser(user_pb2.GetUserRequest(id=created.user.id, min_position=far), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "past the end" in err.details()


def test_get_waiting_for_a_partition_the_topic_lacks_is_invalid_argument(users, partitions):
    err = _error(
        lambda: users.GetUser(
            user_pb2.GetUserRequest(id=1, min_position=user_pb2.Position(partition=partitions, offset=0)),
            timeout=TIMEOUT,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in usc.field_violations(err)] == ["min_position.partition"]


# --- ProjectionService -----------------------------------------------------------


def _check_snapshot(snapshot: projection_pb2.ProgressSnapshot, partitions: int) -> None:
    assert sorted(p.partition for p in snapshot.partitions) == list(range(partitions))
    assert snapshot.HasField("time")
    for p in snapshot.partitions:
        assert p.lag >= 0
        assert p.log_end_offset >= p.log_start_offset
    if os.environ.get("USER_SERVICE_TOPIC"):  # set by scripts/with-service
        assert snapshot.topic == os.environ["USER_SERVICE_TOPIC"]
    if os.environ.get("USER_SERVICE_GROUP"):
        assert snapshot.group == os.environ["USER_SERVICE_GROUP"]


def test_get_progress_reports_every_partition(progress, partitions):
    resp = progress.GetProgress(projection_pb2.GetProgressRequest(), timeout=TIMEOUT)
    _check_snapshot(resp.snapshot, partitions)


def test_watch_progress_streams_snapshots_and_cancels(progress, partitions):
    stream = progress.WatchProgress(
        projection_pb2.WatchProgressRequest(interval=_ms(200)), timeout=TIMEOUT
    )
    start = time.monotonic()
    received, times = [], []
    for resp in stream:
        _check_snapshot(resp.snapshot, partitions)
        received.append(time.monotonic() - start)
        times.append(resp.snapshot.time.ToNanoseconds())
        if len(received) == 4:
            break
    assert len(received) == 4
    # One at once, then one per interval.
    assert received[0] < 5.0
    assert received[3] - received[0] >= 0.5, received
    # Each a fresh poll of Kafka, never the same snapshot twice.
    assert times == sorted(set(times)), times

    assert stream.cancel()
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_watch_progress_helper_on_the_live_service(progress, partitions):
    snapshots = usc.watch_progress(progress, projection_pb2.WatchProgressRequest(interval=_ms(200)))
    times = []
    for snapshot in snapshots:
        _check_snapshot(snapshot, partitions)
        times.append(snapshot.time.ToNanoseconds())
        if len(times) == 4:
            break
    snapshots.close()
    assert times == sorted(set(times)), times


def _snapshot_times(stream, n: int) -> list:
    times = []
    for resp in stream:
        times.append(resp.snapshot.time.ToNanoseconds())
        if len(times) == n:
            break
    stream.cancel()
    return times


#: A poller that has not polled for this long serves no watcher with a shorter
#: interval; every other watcher this suite opens asks for 1 s or less.
QUIET_S = 2.0
#: Just under the longest interval (1 h): faster than a poller planned for a
#: 1 h watcher, so joining wakes it for one poll, and still about an hour.
NEARLY_AN_HOUR = duration_pb2.Duration(seconds=3599)


def _newest_poll(progress) -> int:
    """The time of the poller's newest snapshot of the service's own group,
    read without making it poll: a watcher at the longest interval is served
    the newest snapshot at once, and being no faster than any other watcher,
    does not wake the poller (a new poller polls once)."""
    probe = progress.WatchProgress(
        projection_pb2.WatchProgressRequest(interval=duration_pb2.Duration(seconds=3600)),
        timeout=TIMEOUT,
    )
    try:
        return next(probe).snapshot.time.ToNanoseconds()
    finally:
        probe.cancel()


def _wait_for_newest_poll(progress, what: str, done, limit: float = 30.0) -> int:
    """Reads the newest poll's time until `done(time, seconds it has stayed
    the newest)`; fails the test after `limit` seconds."""
    deadline = time.monotonic() + limit
    newest, since = None, time.monotonic()
    while True:
        t = _newest_poll(progress)
        now = time.monotonic()
        if t != newest:
            newest, since = t, now
        if done(t, now - since):
            return t
        assert now < deadline, f"never saw {what} within {limit:.0f} s (newest poll at {t} ns)"
        time.sleep(0.1)


def _slowly_polled(progress):
    """Brings the service's own poller to where these tests need it, whatever
    ran before: no other watcher left polling it (its newest snapshot stays
    the newest for QUIET_S), then a watcher of about an hour that joins and
    wakes it for one fresh poll, after which it sleeps about an hour. Returns
    that watcher's stream (open)."""
    quiet = _wait_for_newest_poll(
        progress, f"the poller quiet for {QUIET_S} s", lambda _, steady_s: steady_s >= QUIET_S
    )
    slow = progress.WatchProgress(
        projection_pb2.WatchProgressRequest(interval=NEARLY_AN_HOUR), timeout=TIMEOUT
    )
    next(slow)
    _wait_for_newest_poll(progress, "the poll the slow watcher woke", lambda t, _: t > quiet)
    return slow


def test_watch_progress_faster_watcher_replans_a_slow_poller(progress):
    slow = _slowly_polled(progress)
    try:
        # The newest snapshot is fresh: the fast watcher is served it at once,
        # and only its joining can make the poller re-plan.
        fast = progress.WatchProgress(
            projection_pb2.WatchProgressRequest(interval=_ms(200)), timeout=TIMEOUT
        )
        start = time.monotonic()
        times = _snapshot_times(fast, 4)
        elapsed = time.monotonic() - start
    finally:
        slow.cancel()
    assert len(set(times)) == 4, times
    # Not a speed check: the bug this guards against stalled the fast watcher
    # for the slow one's whole hour.
    assert elapsed < 10.0, f"4 snapshots 200 ms apart took {elapsed:.2f}s"


def test_watch_progress_joining_after_a_slow_watcher_left_is_not_stalled(progress):
    slow = _slowly_polled(progress)
    slow.cancel()
    # The poller now sleeps about an hour with nobody watching. 1 s, so that
    # its fresh snapshot is served at once: the service then does not poke the
    # poller for a first snapshot either.
    fast = progress.WatchProgress(projection_pb2.WatchProgressRequest(interval=_ms(1000)), timeout=15)
    # 3 snapshots 1 s apart take 2 s; the bug this guards against took an hour.
    assert len(_snapshot_times(fast, 3)) == 3


def test_watch_progress_rejects_a_too_short_interval(progress):
    stream = progress.WatchProgress(
        projection_pb2.WatchProgressRequest(interval=_ms(50)), timeout=TIMEOUT
    )
    err = _error(lambda: next(stream))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in usc.field_violations(err)] == ["interval"]


# --- grpc.health.v1 ----------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "user.v1.UserService", "user.v1.ProjectionService"])
def test_health_serving(health, service):
    resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_health_unknown_service_is_not_found(health):
    err = _error(
        lambda: health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT)
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
