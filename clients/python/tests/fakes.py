"""In-process fake servers for what the live service cannot be made to do on
demand (answer ABORTED, end a stream mid-way, be two instances that count
their calls). They test the client's own behaviour: retries, request ids,
balancing, resuming streams."""

from __future__ import annotations

import contextlib
import threading
from concurrent import futures
from typing import Iterator, List, Optional, Sequence

import grpc
import grpc.aio
from google.protobuf import timestamp_pb2

from userservice_client.user.v1 import projection_pb2, projection_pb2_grpc, user_pb2, user_pb2_grpc


class FakeUsers(user_pb2_grpc.UserServiceServicer):
    """CreateUser answers the codes in ``fail_with`` to the first attempts,
    one each, then OK (or ``always`` to every attempt); records each attempt's
    request."""

    def __init__(self, fail_with: Sequence[grpc.StatusCode] = (), always: Optional[grpc.StatusCode] = None):
        self.fail_with = list(fail_with)
        self.always = always
        self.requests: List[user_pb2.CreateUserRequest] = []
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def request_ids(self) -> List[str]:
        with self._lock:
            return [r.request_id for r in self.requests]

    def CreateUser(self, request, context):
        with self._lock:
            self.requests.append(request)
            n = len(self.requests)
        if self.always is not None:
            context.abort(self.always, f"always {self.always.name}")
        if n <= len(self.fail_with):
            context.abort(self.fail_with[n - 1], f"attempt {n}")
        return user_pb2.CreateUserResponse(
            user=user_pb2.User(id=n, name=request.name, email=request.email),
            position=user_pb2.Position(partition=0, offset=n),
        )


def snapshot_at(seconds: int) -> projection_pb2.WatchProgressResponse:
    return projection_pb2.WatchProgressResponse(
        snapshot=projection_pb2.ProgressSnapshot(
            time=timestamp_pb2.Timestamp(seconds=seconds), group="fake-group", topic="fake-topic"
        )
    )


#: A script's end: the stream stays open until the client cancels it.
OPEN = "open"


class FakeProgress(projection_pb2_grpc.ProjectionServiceServicer):
    """WatchProgress plays one script per call: a list of snapshot times
    (seconds) to send, then how the stream ends: None (OK, as a draining
    instance ends it), a status code, or OPEN (stays open until cancelled;
    ``cancelled`` is set then). Past the scripts, a call fails with
    FAILED_PRECONDITION."""

    def __init__(self, scripts: Sequence[tuple]):
        self.scripts = list(scripts)
        self.calls = 0
        self.cancelled = threading.Event()
        self._lock = threading.Lock()

    def WatchProgress(self, request, context):
        with self._lock:
            n = self.calls
            self.calls += 1
        if n >= len(self.scripts):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no script for call {n}")
        times, end = self.scripts[n]
        for t in times:
            yield snapshot_at(t)
        if end == OPEN:
            context.add_callback(self.cancelled.set)
            while context.is_active():
                threading.Event().wait(0.02)
        elif end is not None:
            context.abort(end, f"stream {n} ends with {end.name}")


@contextlib.contextmanager
def serve(*, users=None, progress=None) -> Iterator[str]:
    """Serves the given servicers on 127.0.0.1:<free port>; yields host:port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    if users is not None:
        user_pb2_grpc.add_UserServiceServicer_to_server(users, server)
    if progress is not None:
        projection_pb2_grpc.add_ProjectionServiceServicer_to_server(progress, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """A sync interceptor that records each request it passes on (installed
    after the client's own, it sees the request id the client chose)."""

    def __init__(self) -> None:
        self.requests: list = []

    def intercept_unary_unary(self, continuation, client_call_details, request):
        self.requests.append(request)
        return continuation(client_call_details, request)


class AioRecorder(grpc.aio.UnaryUnaryClientInterceptor):
    """:class:`Recorder` for grpc.aio."""

    def __init__(self) -> None:
        self.requests: list = []

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        self.requests.append(request)
        return await continuation(client_call_details, request)
