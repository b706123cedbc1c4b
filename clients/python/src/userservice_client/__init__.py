"""Python client for user-service.

The generated code lives in :mod:`userservice_client.user.v1` (``user_pb2``,
``projection_pb2`` and their ``*_pb2_grpc`` stubs; regenerate it with
``scripts/gen-python-client``). This module adds a little on top:

- :func:`connect` / :func:`connect_aio`: a plaintext channel to ``addr`` (or
  ``$USER_SERVICE_ADDR``) with retries of ``UNAVAILABLE`` turned on;
- :func:`rich_status`, :func:`bad_request`, :func:`field_violations`: the
  ``google.rpc.Status`` details that come with an error (e.g. the
  ``google.rpc.BadRequest`` field violations of an ``INVALID_ARGUMENT``), from a
  sync :class:`grpc.RpcError` or a :class:`grpc.aio.AioRpcError` alike.

::

    import userservice_client as usc
    from userservice_client.user.v1 import user_pb2

    with usc.connect("127.0.0.1:50051") as channel:
        users = usc.UserServiceStub(channel)
        created = users.CreateUser(user_pb2.CreateUserRequest(name="Ada", email="ada@example.com"))
"""

from __future__ import annotations

import json
import os
from typing import Any, List, Optional, Sequence, Tuple

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
    "CHANNEL_OPTIONS",
    "SERVICE_CONFIG",
    "HealthStub",
    "ProjectionServiceStub",
    "UserServiceStub",
    "bad_request",
    "connect",
    "connect_aio",
    "field_violations",
    "health_pb2",
    "health_pb2_grpc",
    "projection_pb2",
    "projection_pb2_grpc",
    "rich_status",
    "user_pb2",
    "user_pb2_grpc",
]

#: The environment variable :func:`connect` reads when given no address
#: (``scripts/with-service`` sets it).
ADDR_ENV = "USER_SERVICE_ADDR"

#: Retry a call that failed with UNAVAILABLE (Kafka or Redis unreachable, or
#: the connection failed) up to 4 attempts in all, with exponential backoff.
#: CreateUser is safe to retry only with a ``request_id``: set one, or a retry
#: after a publish that timed out on our side but reached Kafka may create a
#: second user.
#:
#: Separately from this policy, grpc-python (with ``grpc.enable_retries``, on
#: by default) transparently retries a call that a GOAWAY left unprocessed,
#: e.g. one sent while the service drains on SIGTERM: the server never saw it,
#: so it goes to a new connection without counting as an attempt.
SERVICE_CONFIG: dict = {
    "methodConfig": [
        {
            "name": [
                {"service": "user.v1.UserService"},
                {"service": "user.v1.ProjectionService"},
                {"service": "grpc.health.v1.Health"},
            ],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}

#: Channel options :func:`connect` and :func:`connect_aio` pass.
CHANNEL_OPTIONS: Tuple[Tuple[str, Any], ...] = (
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
)

_Options = Sequence[Tuple[str, Any]]


def _target(addr: Optional[str]) -> str:
    target = addr or os.environ.get(ADDR_ENV)
    if not target:
        raise ValueError(f"no address given and ${ADDR_ENV} is not set (want host:port)")
    return target


def _merge(options: _Options) -> List[Tuple[str, Any]]:
    # gRPC core keeps the first of two options with the same name, so a plain
    # concatenation would not let the caller's win.
    merged = dict(CHANNEL_OPTIONS)
    merged.update(dict(options))
    return list(merged.items())


def connect(
    addr: Optional[str] = None,
    *,
    credentials: Optional[grpc.ChannelCredentials] = None,
    options: _Options = (),
) -> grpc.Channel:
    """A sync channel to ``addr`` (default ``$USER_SERVICE_ADDR``), plaintext
    unless ``credentials`` are given, with :data:`CHANNEL_OPTIONS`; an option
    in ``options`` replaces the one of the same name there (e.g.
    ``options=[("grpc.enable_retries", 0)]``)."""
    target = _target(addr)
    opts = _merge(options)
    if credentials is None:
        return grpc.insecure_channel(target, options=opts)
    return grpc.secure_channel(target, credentials, options=opts)


def connect_aio(
    addr: Optional[str] = None,
    *,
    credentials: Optional[grpc.ChannelCredentials] = None,
    options: _Options = (),
) -> grpc.aio.Channel:
    """Like :func:`connect`, for ``grpc.aio``; call it inside the running event loop."""
    target = _target(addr)
    opts = _merge(options)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=opts)
    return grpc.aio.secure_channel(target, credentials, options=opts)


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
