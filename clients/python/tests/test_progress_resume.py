"""watch_progress / watch_progress_aio against a fake ProjectionService whose
streams end mid-way (as a draining instance ends them), fail with
UNAVAILABLE (a restart, a lost connection) and resend snapshots already seen
(a reopened stream starts with the newest one, which may be old news). The
live counterparts are in test_sync.py and test_aio.py."""

from __future__ import annotations

import contextlib

import grpc
import pytest
from fakes import OPEN, FakeProgress, serve

import userservice_client as usc

U = grpc.StatusCode.UNAVAILABLE

#: Per call: the snapshot times (seconds) sent, then how the stream ends.
SCRIPTS = [
    ([1, 2, 3], None),  # ends cleanly mid-way (drain)
    ([3, 4, 5], U),  # starts with 3 again; then the connection is lost
    ([4, 5, 6, 7], None),  # another instance, behind: 4 and 5 are old news
    ([], U),  # restarting: refused before any answer (grpc-core's policy retries it)
    ([7, 8, 9], OPEN),
]
EXPECTED = [1, 2, 3, 4, 5, 6, 7, 8, 9]
FAST = dict(initial_backoff=0.01, max_backoff=0.05)


def _seconds(snapshots) -> list:
    return [s.time.seconds for s in snapshots]


def test_watch_progress_resumes_without_duplicates():
    fake = FakeProgress(SCRIPTS)
    with serve(progress=fake) as addr, usc.connect(addr) as ch:
        got = []
        snapshots = usc.watch_progress(usc.ProjectionServiceStub(ch), **FAST)
        for snap in snapshots:
            got.append(snap)
            if len(got) == len(EXPECTED):
                break
        snapshots.close()
        assert _seconds(got) == EXPECTED
        assert fake.calls == len(SCRIPTS)
        # Closing the generator cancelled the open stream.
        assert fake.cancelled.wait(30)  # a fact awaited; a loaded CI host took over 5 s


def test_watch_progress_raises_what_it_cannot_resume():
    fake = FakeProgress([([1], None), ([], grpc.StatusCode.PERMISSION_DENIED)])
    with serve(progress=fake) as addr, usc.connect(addr) as ch:
        got = []
        with pytest.raises(grpc.RpcError) as info:
            for snap in usc.watch_progress(ch, **FAST):  # a channel will do too
                got.append(snap)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _seconds(got) == [1]
    assert fake.calls == 2


def test_watch_progress_gives_up_after_max_failures():
    # Each stream ends at once with the snapshot already seen: no progress.
    fake = FakeProgress([([1], None)] * 5)
    with serve(progress=fake) as addr, usc.connect(addr) as ch:
        got = list(usc.watch_progress(ch, max_failures=2, **FAST))
    assert _seconds(got) == [1]
    assert fake.calls == 3  # the first stream, then 2 reopenings


@pytest.mark.asyncio
async def test_aio_watch_progress_resumes_without_duplicates():
    fake = FakeProgress(SCRIPTS)
    with serve(progress=fake) as addr:
        async with usc.connect_aio(addr) as ch:
            got = []
            async with contextlib.aclosing(
                usc.watch_progress_aio(usc.ProjectionServiceStub(ch), **FAST)
            ) as snapshots:
                async for snap in snapshots:
                    got.append(snap)
                    if len(got) == len(EXPECTED):
                        break
            assert _seconds(got) == EXPECTED
            assert fake.calls == len(SCRIPTS)
            assert fake.cancelled.wait(30)  # a fact awaited; a loaded CI host took over 5 s


@pytest.mark.asyncio
async def test_aio_watch_progress_raises_what_it_cannot_resume():
    fake = FakeProgress([([1], U), ([], grpc.StatusCode.PERMISSION_DENIED)])
    with serve(progress=fake) as addr:
        async with usc.connect_aio(addr) as ch:
            got = []
            with pytest.raises(grpc.RpcError) as info:
                async for snap in usc.watch_progress_aio(ch, **FAST):
                    got.append(snap)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert _seconds(got) == [1]
    assert fake.calls == 2
