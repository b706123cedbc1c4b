"""connect()'s retry policy, against an in-process server that always answers
UNAVAILABLE (the real service only does so when Kafka or Redis is down)."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import userservice_client as usc


class _Unavailable(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def Check(self, request, context):
        with self._lock:
            self.calls += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "try again")


@pytest.fixture
def unavailable():
    servicer = _Unavailable()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0)


def test_unavailable_is_retried_up_to_4_attempts(unavailable):
    addr, servicer = unavailable
    with usc.connect(addr) as ch:
        with pytest.raises(grpc.RpcError) as info:
            usc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert servicer.calls == 4


def test_caller_options_replace_the_defaults(unavailable):
    addr, servicer = unavailable
    with usc.connect(addr, options=[("grpc.enable_retries", 0)]) as ch:
        with pytest.raises(grpc.RpcError):
            usc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert servicer.calls == 1
