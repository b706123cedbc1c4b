"""The channels' keepalive against the live service, seen on the wire: on a
quiet stream, the client pings after 30 s without reads (not before), the
service answers, and the stream stays open. Sync and grpc.aio side by side, so
the ~30 s wait is paid once.

The service pings every connection every 30 s too, and a client pings only
after 30 s without reads: the proxy (tests/h2spy.py) answers the service's
pings itself, so that the client's own show."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from google.protobuf import duration_pb2
from h2spy import ACK, PING, H2Spy

import userservice_client as usc
from userservice_client.user.v1 import projection_pb2

pytestmark = pytest.mark.slow

#: The longest interval: one snapshot at once, then nothing for an hour.
QUIET = projection_pb2.WatchProgressRequest(interval=duration_pb2.Duration(seconds=3600))


def _keepalive_pings(spy: H2Spy, after: float) -> list:
    # Pings in the first second are grpc-core's BDP probes, sent as data arrives.
    return [t - after for t in spy.pings("c2s") if t > after + 1.0]


def _acked(spy: H2Spy, ping_at: float) -> bool:
    return any(d == "s2c" and typ == PING and flags & ACK and t >= ping_at for t, d, typ, flags in spy.frames)


@pytest.mark.asyncio
async def test_keepalive_pings_a_quiet_stream_every_30s_and_the_service_answers(addr):
    with H2Spy(addr, absorb_server_pings=True) as sync_spy, H2Spy(addr, absorb_server_pings=True) as aio_spy:
        with usc.connect(sync_spy.addr) as ch:
            async with usc.connect_aio(aio_spy.addr) as aio_ch:
                sync_call = usc.ProjectionServiceStub(ch).WatchProgress(QUIET, timeout=60)
                next(sync_call)
                sync_start = time.monotonic()
                aio_call = usc.ProjectionServiceStub(aio_ch).WatchProgress(QUIET, timeout=60)
                await aio_call.read()
                aio_start = time.monotonic()

                deadline = time.monotonic() + 40
                while time.monotonic() < deadline and not (
                    _keepalive_pings(sync_spy, sync_start) and _keepalive_pings(aio_spy, aio_start)
                ):
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)  # the service's ACK

                for api, spy, start in (("sync", sync_spy, sync_start), ("aio", aio_spy, aio_start)):
                    pings = _keepalive_pings(spy, start)
                    assert pings, f"{api}: no keepalive PING within 40 s of quiet"
                    assert 29.0 <= pings[0] <= 36.0, f"{api}: first keepalive PING after {pings[0]:.1f} s"
                    assert _acked(spy, start + pings[0]), f"{api}: the service did not answer the PING"
                    assert not spy.goaways(), f"{api}: GOAWAY {spy.goaways()}"
                # Both streams are still open.
                assert not aio_call.done()
                assert aio_call.cancel()
                assert await aio_call.code() == grpc.StatusCode.CANCELLED
                assert sync_call.cancel()
                with pytest.raises(grpc.RpcError) as info:
                    next(sync_call)
                assert info.value.code() == grpc.StatusCode.CANCELLED
