//go:build sidecar

// Package sidecartest drives the service through a proxy (nginx or HAProxy)
// during a rolling restart. It runs only under scripts/check-sidecar, which
// starts the instances and the proxies and sets the environment; `go test
// ./...` leaves it out (build tag `sidecar`).
package sidecartest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
)

func env(t *testing.T, name string) string {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		t.Fatalf("%s is not set: run this test through scripts/check-sidecar", name)
	}
	return v
}

// attempts counts what the caller does not see: the calls made (an
// interceptor, once per call) and their attempts (the stats handler, once per
// attempt), so attempts - calls is how many retries grpc-go made; transparent
// ones (a refused stream, a GOAWAY) are counted apart from the retry policy's.
// Attempts that ended in an error count as failed attempts.
type attempts struct{ calls, started, transparent, failed atomic.Int64 }

func (*attempts) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

func (a *attempts) HandleRPC(_ context.Context, s stats.RPCStats) {
	switch s := s.(type) {
	case *stats.Begin:
		a.started.Add(1)
		if s.IsTransparentRetryAttempt {
			a.transparent.Add(1)
		}
	case *stats.End:
		if s.Error != nil && status.Code(s.Error) != codes.Canceled {
			a.failed.Add(1)
		}
	}
}

func (*attempts) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }

func (*attempts) HandleConn(context.Context, stats.ConnStats) {}

// options: the stats handler and the interceptors that count calls.
func (a *attempts) options() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithStatsHandler(a),
		grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
			cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
			a.calls.Add(1)
			return invoker(ctx, method, req, reply, cc, opts...)
		}),
		grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
			method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
			a.calls.Add(1)
			return streamer(ctx, desc, cc, method, opts...)
		}),
	}
}

// dial connects the way a caller of the Go client does: userclient.Dial, with
// the client's retry policy (UNAVAILABLE is retried; CreateUser carries a
// request_id, so that is safe), plus any extra options.
func dial(t *testing.T, addr string, opts ...grpc.DialOption) *userclient.Client {
	t.Helper()
	c, err := userclient.Dial(addr, opts...)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestRollingRestartBehindSidecar keeps creating and reading users and
// watching progress through the sidecar (SIDECAR_PROXY names it: nginx or
// haproxy) while scripts/check-sidecar starts another instance and SIGTERMs
// the one it replaces. No call may fail as its caller sees it (after grpc-go's
// transparent retries and the Go client's retry policy), whatever its code;
// the retries are counted and reported, not failures. The drained instance
// must have said NOT_SERVING on its health Watch before the stream closed. A
// progress stream that the drained instance ends cleanly (EOF) is reopened;
// that is not a failure.
func TestRollingRestartBehindSidecar(t *testing.T) {
	sidecar := env(t, "SIDECAR_ADDR")
	proxy := os.Getenv("SIDECAR_PROXY")
	if proxy == "" {
		proxy = "sidecar"
	}
	drained := env(t, "DRAINED_ADDR")
	rolledFile := env(t, "ROLLED_FILE")
	readyFile := env(t, "READY_FILE")

	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()

	// The drained instance's own health stream, watched directly (as the mesh's
	// health checker would).
	watchDone := make(chan []healthpb.HealthCheckResponse_ServingStatus, 1)
	var watching atomic.Bool
	go func() {
		var seen []healthpb.HealthCheckResponse_ServingStatus
		defer func() { watchDone <- seen }()
		stream, err := dial(t, drained).Health.Watch(ctx, &healthpb.HealthCheckRequest{})
		if err != nil {
			return
		}
		for {
			r, err := stream.Recv()
			if err != nil {
				return
			}
			seen = append(seen, r.GetStatus())
			watching.Store(true)
		}
	}()

	var tries attempts
	client := dial(t, sidecar, tries.options()...)
	users, progress := client.Users, client.Projection

	// The topic's partition count, as the service reads it from Kafka's
	// metadata: every snapshot during the restart must show that many.
	first, err := progress.GetProgress(ctx, &userv1.GetProgressRequest{})
	if err != nil {
		t.Fatalf("GetProgress before the restart: %v", err)
	}
	partitions := len(first.GetSnapshot().GetPartitions())
	for i, p := range first.GetSnapshot().GetPartitions() {
		if p.GetPartition() != int32(i) {
			t.Fatalf("the topic's partitions are not 0..%d: %v", partitions-1, first.GetSnapshot().GetPartitions())
		}
	}
	if partitions == 0 {
		t.Fatalf("the service reports no partitions for its topic: %v", first.GetSnapshot())
	}

	var calls atomic.Int64
	var mu sync.Mutex
	var failed []error
	record := func(what string, err error) {
		calls.Add(1)
		if err == nil {
			return
		}
		mu.Lock()
		failed = append(failed, fmt.Errorf("%s: %w", what, err))
		mu.Unlock()
	}

	rolled := func() bool { _, err := os.Stat(rolledFile); return err == nil }
	var stopAt atomic.Int64 // unix nanos; 0 until the restart is done
	running := func() bool {
		if ctx.Err() != nil {
			return false
		}
		if s := stopAt.Load(); s != 0 {
			return time.Now().UnixNano() < s
		}
		if rolled() {
			stopAt.Store(time.Now().Add(2 * time.Second).UnixNano())
		}
		return true
	}

	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; running(); i++ {
				cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
				created, err := users.CreateUser(cctx, &userv1.CreateUserRequest{
					Name: fmt.Sprintf("rolling %d-%d", w, i), Email: "rolling@example.com",
					RequestId: fmt.Sprintf("rolling-%d-%d-%d", os.Getpid(), w, i),
				})
				record("CreateUser", err)
				if err == nil {
					_, err = users.GetUser(cctx, &userv1.GetUserRequest{
						Id: created.GetUser().GetId(), MinPosition: created.GetPosition()})
					record("GetUser", err)
				}
				ccancel()
			}
		}(w)
	}

	// Progress streams through the sidecar; a stream that ends (its instance
	// drained) is reopened, and lands on the new instance.
	var snapshots, reopened atomic.Int64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for running() {
			stream, err := progress.WatchProgress(ctx, &userv1.WatchProgressRequest{Interval: durationpb.New(200 * time.Millisecond)})
			record("WatchProgress", err)
			if err != nil {
				time.Sleep(50 * time.Millisecond) // a failure already; do not spin
				continue
			}
			for running() {
				snap, err := stream.Recv()
				if err != nil {
					if !errors.Is(err, io.EOF) {
						record("WatchProgress stream", err)
					}
					reopened.Add(1)
					break
				}
				if n := len(snap.GetSnapshot().GetPartitions()); n != partitions {
					record("WatchProgress stream", fmt.Errorf("a snapshot with %d partitions, the topic has %d", n, partitions))
				}
				snapshots.Add(1)
			}
		}
	}()
	// Tell scripts/check-sidecar to start the restart once load flows and the
	// drained instance's health is being watched.
	for ctx.Err() == nil && !(watching.Load() && calls.Load() >= 50 && snapshots.Load() >= 1) {
		time.Sleep(20 * time.Millisecond)
	}
	if err := os.WriteFile(readyFile, nil, 0o644); err != nil {
		t.Fatalf("cannot signal readiness: %v", err)
	}
	wg.Wait()

	if !rolled() {
		t.Fatalf("the restart never finished")
	}
	seen := <-watchDone
	retries := tries.started.Load() - tries.calls.Load()
	// One line scripts/check-sidecar picks up for its summary.
	t.Logf("RESULT %s: %d calls, %d failed as the caller sees them; %d attempts: %d retries "+
		"(%d transparent, %d by the retry policy), %d attempts failed; "+
		"%d progress snapshots of %d partitions, %d stream reopenings; drained instance's health: %v",
		proxy, calls.Load(), len(failed), tries.started.Load(), retries,
		tries.transparent.Load(), retries-tries.transparent.Load(), tries.failed.Load(),
		snapshots.Load(), partitions, reopened.Load(), seen)
	for _, err := range failed {
		t.Errorf("a call failed: %v", err)
	}
	if calls.Load() < 100 {
		t.Errorf("only %d calls went through", calls.Load())
	}
	if snapshots.Load() < 5 {
		t.Errorf("only %d progress snapshots flowed through the sidecar", snapshots.Load())
	}
	if len(seen) < 2 || seen[0] != healthpb.HealthCheckResponse_SERVING ||
		seen[len(seen)-1] != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Errorf("the drained instance's Watch should go SERVING → NOT_SERVING before closing, saw %v", seen)
	}
}

// TestGoawayIsRetried sends more calls than nginx allows on one client
// connection (keepalive_requests 1000 on this sidecar): nginx then ends the
// connection with a GOAWAY, and grpc-go retries what it left unprocessed, so
// no call fails.
func TestGoawayIsRetried(t *testing.T) {
	addr := env(t, "GOAWAY_SIDECAR_ADDR")
	var tries attempts
	health := dial(t, addr, tries.options()...).Health
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var failed atomic.Int64
	var firstErr atomic.Value
	for w := 0; w < 16; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 160; i++ {
				if _, err := health.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
				}
			}
		}()
	}
	wg.Wait()
	retries := tries.started.Load() - tries.calls.Load()
	t.Logf("RESULT nginx GOAWAY every 1,000 calls: %d calls, %d failed as the caller sees them; "+
		"%d retries (%d transparent, %d by the retry policy)", tries.calls.Load(), failed.Load(),
		retries, tries.transparent.Load(), retries-tries.transparent.Load())
	if failed.Load() > 0 {
		t.Fatalf("%d of 2560 calls failed across nginx's GOAWAYs; first: %v", failed.Load(), firstErr.Load())
	}
}
