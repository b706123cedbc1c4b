// Package testenv gives the tests the live service that scripts/with-service
// started for them.
package testenv

import (
	"context"
	"math/rand/v2"
	"os"
	"sync/atomic"
	"testing"
	"time"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// Addr is the address of the service under test, from USER_SERVICE_ADDR. The
// tests need a live service (Kafka, Redis and a fresh instance); without one
// they fail, on purpose, rather than skip.
func Addr(t testing.TB) string {
	t.Helper()
	addr := os.Getenv("USER_SERVICE_ADDR")
	if addr == "" {
		if told.Swap(true) {
			t.Fatal("USER_SERVICE_ADDR is not set (see the first failure): run the tests via scripts/with-service")
		}
		t.Fatal("USER_SERVICE_ADDR is not set: these tests need a live user-service. " +
			"Run them from the repo root with\n\n" +
			"    scripts/with-service bash -c 'cd clients/go && go test ./... -count=1'\n\n" +
			"(or point USER_SERVICE_ADDR at a running instance, e.g. 127.0.0.1:50051 from scripts/run)")
	}
	return addr
}

// told is set once the full explanation has been printed in this package.
var told atomic.Bool

// Client dials the service under test; the connection closes with the test.
func Client(t testing.TB) *userclient.Client {
	t.Helper()
	c, err := userclient.Dial(Addr(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// Context is a context for one test's calls, bounded so that a hung service
// fails the test instead of the whole run.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// Group is the service's consumer group (USER_SERVICE_GROUP), or "" if the
// runner did not say.
func Group() string { return os.Getenv("USER_SERVICE_GROUP") }

// Topic is the service's event topic (USER_SERVICE_TOPIC), or "".
func Topic() string { return os.Getenv("USER_SERVICE_TOPIC") }

// Partitions is the partition count of the service's topic, as the service
// reads it from Kafka's metadata: the partitions of a GetProgress snapshot of
// its own group and topic, which must be 0..n-1 with n > 0. Tests compare
// positions and snapshots with it instead of assuming a count.
func Partitions(t testing.TB) int {
	t.Helper()
	resp, err := Client(t).Projection.GetProgress(Context(t), &userv1.GetProgressRequest{})
	if err != nil {
		t.Fatalf("GetProgress, for the topic's partition count: %v", err)
	}
	ps := resp.GetSnapshot().GetPartitions()
	if len(ps) == 0 {
		t.Fatalf("the service reports no partitions for its topic: %v", resp.GetSnapshot())
	}
	for i, p := range ps {
		if p.GetPartition() != int32(i) {
			t.Fatalf("the topic's partitions are not 0..%d: %v", len(ps)-1, ps)
		}
	}
	return len(ps)
}

// RandomID is a large random user id (2^40 to 2^62), far from the ids the
// service assigns from 1 up, so reruns against one instance do not collide.
func RandomID() int64 { return 1<<40 + rand.Int64N(1<<62-1<<40) }

// Unique is a short random suffix for names and request ids.
func Unique() string {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	b := make([]byte, 10)
	for i := range b {
		b[i] = letters[rand.IntN(len(letters))]
	}
	return string(b)
}
