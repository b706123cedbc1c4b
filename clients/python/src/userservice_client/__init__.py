"""Python client for user-service.

The generated code lives in :mod:`userservice_client.user.v1` (``user_pb2``,
``projection_pb2`` and their ``*_pb2_grpc`` stubs; regenerate it with
``scripts/gen-python-client``). This module adds the defaults every caller
should have:

- :func:`connect` / :func:`connect_aio`: a channel to ``addr`` (or
  ``$USER_SERVICE_ADDR``) with

  - the shared retry policy (:data:`SERVICE_CONFIG`, loaded from the package's
    ``service_config.json``, a copy of ``clients/shared/service_config.json``):
    CreateUser retried on ``UNAVAILABLE`` and ``ABORTED``, GetUser also on
    ``DEADLINE_EXCEEDED``, ProjectionService on ``UNAVAILABLE``;
  - a request id on every CreateUser: an interceptor fills an empty
    ``request_id`` with a fresh UUID before the first attempt, so every retry
    of that call carries the same one and cannot create a second user;
  - keepalive matching the server's (:data:`KEEPALIVE_OPTIONS`);
  - ``balanced=True``: ``round_robin`` over every address the target resolves
    to (``dns:///host:port``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``);

- :func:`watch_progress` / :func:`watch_progress_aio`: a ``WatchProgress``
  stream that survives a drain, a restart or a GOAWAY (reopened with backoff,
  never the same snapshot twice);
- :func:`rich_status`, :func:`bad_request`, :func:`field_violations`: the
  ``google.rpc.Status`` details that come with an error (e.g. the
  ``google.rpc.BadRequest`` field violations of an ``INVALID_ARGUMENT``), from a
  sync :class:`grpc.RpcError` or a :class:`grpc.aio.AioRpcError` alike.

::

    import userservice_client as usc
    from userservice_client.user.v1 import user_pb2

    with usc.connect("127.0.0.1:50051") as channel:
        users = usc.UserServiceStub(channel)
        # Your own key if you may retry the create yourself later (after the
        # call's deadline, or from another process): the same key always
        # answers the same user. Left empty, the client picks one per call.
        created = users.CreateUser(user_pb2.CreateUserRequest(
            name="Ada", email="ada@example.com", request_id=usc.new_request_id()), timeout=5)
        got = users.GetUser(user_pb2.GetUserRequest(
            id=created.user.id, min_position=created.position), timeout=5)
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import os
import random
import time
import uuid
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Collection,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health_pb2_grpc import HealthStub
from grpc_status import rpc_status

from userservice_client.user.v1 import projection_pb2, projection_pb2_grpc, user_pb2, user_pb2_grpc
from userservice_client.user.v1.projection_pb2_grpc import ProjectionServiceStub
from userservice_client.user.v1.user_pb2_grpc import UserServiceStub

__all__ = [
    "ADDR_ENV",
    "BALANCED_OPTIONS",
    "CHANNEL_OPTIONS",
    "CREATE_USER_METHOD",
    "KEEPALIVE_OPTIONS",
    "RESUME_CODES",
    "SERVICE_CONFIG",
    "SERVICE_CONFIG_JSON",
    "AioRequestIdInterceptor",
    "HealthStub",
    "ProjectionServiceStub",
    "RequestIdInterceptor",
    "UserServiceStub",
    "bad_request",
    "connect",
    "connect_aio",
    "field_violations",
    "health_pb2",
    "health_pb2_grpc",
    "new_request_id",
    "projection_pb2",
    "projection_pb2_grpc",
    "rich_status",
    "user_pb2",
    "user_pb2_grpc",
    "watch_progress",
    "watch_progress_aio",
    "with_request_id",
]

#: The environment variable :func:`connect` reads when given no address
#: (``scripts/with-service`` sets it).
ADDR_ENV = "USER_SERVICE_ADDR"

#: The gRPC service config (retry policy) both clients load, as the package
#: ships it: ``service_config.json``, copied from
#: ``clients/shared/service_config.json`` by ``scripts/gen-clients`` (why each
#: code is retried: ``clients/shared/README.md``). Passed to the channel as is.
#:
#: Separately from this policy, grpc-core (with ``grpc.enable_retries``)
#: transparently retries a call that a GOAWAY or a refused stream left
#: unprocessed, e.g. one sent while the service drains on SIGTERM.
SERVICE_CONFIG_JSON: str = (
    importlib.resources.files(__name__).joinpath("service_config.json").read_text(encoding="utf-8")
)
#: :data:`SERVICE_CONFIG_JSON`, parsed.
SERVICE_CONFIG: dict = json.loads(SERVICE_CONFIG_JSON)

#: HTTP/2 keepalive matching the server's (``HTTP2_KEEPALIVE_INTERVAL`` 30 s,
#: ``HTTP2_KEEPALIVE_TIMEOUT`` 10 s): while a call is open (a quiet
#: ``WatchProgress`` at a slow interval), ping every 30 s and drop the
#: connection when a ping goes unanswered for 10 s; no pings without calls,
#: and no limit on pings between data frames (a quiet stream sends none).
KEEPALIVE_OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
)

#: Channel options :func:`connect` and :func:`connect_aio` pass.
CHANNEL_OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG_JSON),
    *KEEPALIVE_OPTIONS,
)

#: What ``balanced=True`` adds: a connection to every address the target
#: resolves to, calls spread over them in turn. Not a default, since one
#: address may be a proxy that balances already.
BALANCED_OPTIONS: Tuple[Tuple[str, Any], ...] = (("grpc.lb_policy_name", "round_robin"),)

#: The method whose empty ``request_id`` the channels' interceptor fills.
CREATE_USER_METHOD = "/user.v1.UserService/CreateUser"
_CREATE_USER_METHOD_BYTES = CREATE_USER_METHOD.encode()

_Options = Sequence[Tuple[str, Any]]


# --- request ids ----------------------------------------------------------------


def new_request_id() -> str:
    """A fresh request id (a random UUID), as the interceptor picks them."""
    return str(uuid.uuid4())


def with_request_id(request: user_pb2.CreateUserRequest) -> user_pb2.CreateUserRequest:
    """``request`` itself if it has a ``request_id``, else a copy with a fresh
    one (the caller's message is left as it is)."""
    if request.request_id:
        return request
    filled = user_pb2.CreateUserRequest()
    filled.CopyFrom(request)
    filled.request_id = new_request_id()
    return filled


def _is_create_user(method: Union[str, bytes], request: Any) -> bool:
    # The sync API names the method as str, grpc.aio as bytes.
    return method in (CREATE_USER_METHOD, _CREATE_USER_METHOD_BYTES) and isinstance(
        request, user_pb2.CreateUserRequest
    )


class RequestIdInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Fills an empty ``CreateUserRequest.request_id`` with a fresh UUID.

    An interceptor runs once per call, above grpc-core's retries: the request
    is serialized once, so every attempt of the call (the retry policy's, and
    the transparent retries after a GOAWAY) carries the same id, and the
    service answers a retry with the first answer. :func:`connect` installs
    it outermost: interceptors passed to :func:`connect` see the filled id."""

    def intercept_unary_unary(self, continuation, client_call_details, request):
        if _is_create_user(client_call_details.method, request):
            request = with_request_id(request)
        return continuation(client_call_details, request)


class AioRequestIdInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """:class:`RequestIdInterceptor` for ``grpc.aio`` (:func:`connect_aio`
    installs it)."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if _is_create_user(client_call_details.method, request):
            request = with_request_id(request)
        return await continuation(client_call_details, request)


# --- channels ---------------------------------------------------------------------


def _target(addr: Optional[str]) -> str:
    target = addr or os.environ.get(ADDR_ENV)
    if not target:
        raise ValueError(f"no address given and ${ADDR_ENV} is not set (want host:port)")
    return target


def _merge(options: _Options, balanced: bool) -> List[Tuple[str, Any]]:
    # gRPC core keeps the first of two options with the same name, so a plain
    # concatenation would not let the caller's win.
    merged = dict(CHANNEL_OPTIONS)
    if balanced:
        merged.update(dict(BALANCED_OPTIONS))
    merged.update(dict(options))
    return list(merged.items())


def connect(
    addr: Optional[str] = None,
    *,
    credentials: Optional[grpc.ChannelCredentials] = None,
    options: _Options = (),
    balanced: bool = False,
    interceptors: Sequence[Any] = (),
) -> grpc.Channel:
    """A sync channel to ``addr`` (default ``$USER_SERVICE_ADDR``): any gRPC
    target, ``host:port``, ``dns:///host:port`` or
    ``ipv4:10.0.0.1:50051,10.0.0.2:50051``.

    Plaintext unless ``credentials`` are given; with :data:`CHANNEL_OPTIONS`
    (the shared retry policy, keepalive), plus :data:`BALANCED_OPTIONS` when
    ``balanced`` (``round_robin`` over every address of the target). An option
    in ``options`` replaces the one of the same name (e.g.
    ``options=[("grpc.enable_retries", 0)]``). A :class:`RequestIdInterceptor`
    runs first, then ``interceptors`` (sync ``grpc.*ClientInterceptor``), in
    order."""
    target = _target(addr)
    opts = _merge(options, balanced)
    if credentials is None:
        channel = grpc.insecure_channel(target, options=opts)
    else:
        channel = grpc.secure_channel(target, credentials, options=opts)
    return grpc.intercept_channel(channel, RequestIdInterceptor(), *interceptors)


def connect_aio(
    addr: Optional[str] = None,
    *,
    credentials: Optional[grpc.ChannelCredentials] = None,
    options: _Options = (),
    balanced: bool = False,
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """Like :func:`connect`, for ``grpc.aio`` (with an
    :class:`AioRequestIdInterceptor` first, then ``interceptors``); call it
    inside the running event loop."""
    target = _target(addr)
    opts = _merge(options, balanced)
    chain = [AioRequestIdInterceptor(), *interceptors]
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=chain)
    return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=chain)


# --- resumable progress ------------------------------------------------------------

#: The codes on which :func:`watch_progress` reopens the stream (besides the
#: stream ending without an error, as it does when an instance drains).
RESUME_CODES: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})


class _Backoff:
    def __init__(self, initial: float, maximum: float, multiplier: float) -> None:
        self.initial, self.maximum, self.multiplier = initial, maximum, multiplier
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """Counts a failure; the delay before the next attempt (±20% jitter)."""
        delay = min(self.maximum, self.initial * self.multiplier**self.failures)
        self.failures += 1
        return delay * random.uniform(0.8, 1.2)


def _progress_stub(progress: Any) -> Any:
    # A stub (sync or aio: the generated class serves both) or a channel.
    return progress if hasattr(progress, "WatchProgress") else ProjectionServiceStub(progress)


def _snapshot_ns(snapshot: projection_pb2.ProgressSnapshot) -> int:
    return snapshot.time.ToNanoseconds()


def watch_progress(
    progress: Any,
    request: Optional[projection_pb2.WatchProgressRequest] = None,
    *,
    metadata: Optional[Sequence[Tuple[str, str]]] = None,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    backoff_multiplier: float = 2.0,
    max_failures: Optional[int] = None,
    resume_codes: Collection[grpc.StatusCode] = RESUME_CODES,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[projection_pb2.ProgressSnapshot]:
    """Yields the snapshots of a ``WatchProgress`` stream that survives the
    service: when the stream ends (an instance draining on SIGTERM ends its
    streams) or fails with a code in ``resume_codes`` (``UNAVAILABLE``: a
    restart, a connection lost after a GOAWAY), it is reopened after an
    exponential backoff (``initial_backoff`` to ``max_backoff`` seconds, reset
    by every new snapshot). A reopened stream starts with the newest snapshot,
    which may be one already yielded: only a snapshot whose ``time`` is later
    than the last one yielded is yielded, so none comes twice.

    ``progress`` is a :class:`ProjectionServiceStub` or a channel. Other codes
    (``INVALID_ARGUMENT``, ``NOT_FOUND``, ``PERMISSION_DENIED``, ...) are
    raised. ``max_failures`` (default: no limit) bounds the reopenings in a row
    without a new snapshot; past it the last error is raised (or the iterator
    ends, if the last stream ended cleanly). Closing the generator (``break``
    out of a ``for``, ``close()``) cancels the open stream."""
    stub = _progress_stub(progress)
    request = request if request is not None else projection_pb2.WatchProgressRequest()
    backoff = _Backoff(initial_backoff, max_backoff, backoff_multiplier)
    last: Optional[int] = None
    while True:
        error: Optional[grpc.RpcError] = None
        call = stub.WatchProgress(request, metadata=metadata)
        try:
            for resp in call:
                t = _snapshot_ns(resp.snapshot)
                if last is not None and t <= last:
                    continue  # seen already (the newest, served again on reopening)
                last = t
                backoff.reset()
                yield resp.snapshot
        except grpc.RpcError as err:
            if err.code() not in resume_codes:
                raise
            error = err
        finally:
            call.cancel()
        if max_failures is not None and backoff.failures >= max_failures:
            if error is not None:
                raise error
            return
        sleep(backoff.next_delay())


async def watch_progress_aio(
    progress: Any,
    request: Optional[projection_pb2.WatchProgressRequest] = None,
    *,
    metadata: Optional[Sequence[Tuple[str, str]]] = None,
    initial_backoff: float = 0.1,
    max_backoff: float = 5.0,
    backoff_multiplier: float = 2.0,
    max_failures: Optional[int] = None,
    resume_codes: Collection[grpc.StatusCode] = RESUME_CODES,
) -> AsyncIterator[projection_pb2.ProgressSnapshot]:
    """:func:`watch_progress` for ``grpc.aio`` (a stub or a channel made by
    :func:`connect_aio`). Close it when done, e.g.
    ``async with contextlib.aclosing(watch_progress_aio(...)) as snapshots:``,
    which cancels the open stream; breaking out of ``async for`` alone leaves
    that to the garbage collector."""
    stub = _progress_stub(progress)
    request = request if request is not None else projection_pb2.WatchProgressRequest()
    backoff = _Backoff(initial_backoff, max_backoff, backoff_multiplier)
    last: Optional[int] = None
    while True:
        error: Optional[grpc.RpcError] = None
        call = stub.WatchProgress(request, metadata=metadata)
        try:
            async for resp in call:
                t = _snapshot_ns(resp.snapshot)
                if last is not None and t <= last:
                    continue
                last = t
                backoff.reset()
                yield resp.snapshot
        except grpc.RpcError as err:
            if err.code() not in resume_codes:
                raise
            error = err
        finally:
            call.cancel()
        if max_failures is not None and backoff.failures >= max_failures:
            if error is not None:
                raise error
            return
        await asyncio.sleep(backoff.next_delay())


# --- error details -------------------------------------------------------------------


def rich_status(error: grpc.RpcError) -> Optional[status_pb2.Status]:
    """The ``google.rpc.Status`` the server sent with ``error`` (trailer
    ``grpc-status-details-bin``), or None. Works for the sync API's
    :class:`grpc.RpcError` and for :class:`grpc.aio.AioRpcError`.

    Raises ValueError if the rich status disagrees with the call's code or
    message (grpc_status.rpc_status.from_call's check)."""
    return rpc_status.from_call(error)  # type: ignore[arg-type]


def bad_request(error: grpc.RpcError) -> Optional[error_details_pb2.BadRequest]:
    """The ``google.rpc.BadRequest`` among ``error``'s details, or None."""
    status = rich_status(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            return br
    return None


def field_violations(error: grpc.RpcError) -> List[Tuple[str, str]]:
    """``(field, description)`` for each field violation of ``error``'s
    ``google.rpc.BadRequest``, in the server's order; empty if it has none."""
    br = bad_request(error)
    if br is None:
        return []
    return [(v.field, v.description) for v in br.field_violations]
