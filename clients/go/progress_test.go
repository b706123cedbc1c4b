package userclient_test

// WatchProgressResumable against a fake ProjectionService whose streams end
// on cue, resend old snapshots and refuse calls (no live service needed; the
// live tests are in defaults_test.go).

import (
	"context"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/timestamppb"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// script is one stream of the fake: snapshots taken at these seconds past
// base, then end with err (nil: a clean end).
type script struct {
	seconds []int
	err     error
}

var base = time.Date(2026, 11, 28, 12, 0, 0, 0, time.UTC)

type scriptedProgress struct {
	userv1.UnimplementedProjectionServiceServer
	mu      sync.Mutex
	streams []script
	opened  int
}

func (s *scriptedProgress) WatchProgress(_ *userv1.WatchProgressRequest, stream grpc.ServerStreamingServer[userv1.WatchProgressResponse]) error {
	s.mu.Lock()
	i := s.opened
	s.opened++
	s.mu.Unlock()
	if i >= len(s.streams) {
		<-stream.Context().Done() // nothing more to say: hold the stream
		return nil
	}
	for _, sec := range s.streams[i].seconds {
		snap := &userv1.ProgressSnapshot{Time: timestamppb.New(base.Add(time.Duration(sec) * time.Second))}
		if err := stream.Send(&userv1.WatchProgressResponse{Snapshot: snap}); err != nil {
			return err
		}
	}
	return s.streams[i].err
}

func (s *scriptedProgress) streamsOpened() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.opened
}

func serveProgress(t *testing.T, streams ...script) (*scriptedProgress, *userclient.Client) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fake := &scriptedProgress{streams: streams}
	s := grpc.NewServer()
	userv1.RegisterProjectionServiceServer(s, fake)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	c, err := userclient.Dial(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return fake, c
}

var errStop = errors.New("stop")

// watch runs a ProgressWatcher with a short backoff until the handler has
// seen `until` seconds past base, and returns what it saw, why it resumed and
// what Run returned.
func watch(t *testing.T, c *userclient.Client, until int, maxFailures int) (seen []int, causes []codes.Code, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	w := userclient.ProgressWatcher{
		Client:      c.Projection,
		Request:     &userv1.WatchProgressRequest{},
		MinBackoff:  time.Millisecond,
		MaxBackoff:  10 * time.Millisecond,
		MaxFailures: maxFailures,
		OnResume: func(cause error, _ time.Duration) {
			if errors.Is(cause, io.EOF) {
				causes = append(causes, codes.OK)
			} else {
				causes = append(causes, status.Code(cause))
			}
		},
	}
	err = w.Run(ctx, func(s *userv1.ProgressSnapshot) error {
		sec := int(s.GetTime().AsTime().Sub(base) / time.Second)
		seen = append(seen, sec)
		if sec == until {
			return errStop
		}
		return nil
	})
	return seen, causes, err
}

// TestWatchProgressResumableDeliversEachSnapshotOnce: streams that end
// cleanly, with UNAVAILABLE, and are refused (RESOURCE_EXHAUSTED) are
// reopened, and snapshots a reopened stream resends (the latest one again,
// an older one) are not delivered again.
func TestWatchProgressResumableDeliversEachSnapshotOnce(t *testing.T) {
	fake, c := serveProgress(t,
		script{[]int{1, 2, 3}, nil},
		script{[]int{3, 2, 4}, status.Error(codes.Unavailable, "restarting")},
		script{nil, status.Error(codes.ResourceExhausted, "too many watchers")},
		script{[]int{4, 5, 6}, nil},
	)
	seen, causes, err := watch(t, c, 6, 0)
	if !errors.Is(err, errStop) {
		t.Fatalf("Run returned %v, want the handler's error", err)
	}
	if want := []int{1, 2, 3, 4, 5, 6}; !slices.Equal(seen, want) {
		t.Fatalf("delivered snapshots at %v s, want %v", seen, want)
	}
	if want := []codes.Code{codes.OK, codes.Unavailable, codes.ResourceExhausted}; !slices.Equal(causes, want) {
		t.Fatalf("resumed after %v, want %v", causes, want)
	}
	if fake.streamsOpened() != 4 {
		t.Fatalf("%d streams opened, want 4", fake.streamsOpened())
	}
}

// TestWatchProgressResumableStopsOnFinalErrors: an error a reopen would not
// mend is returned at once, and so is the last error after MaxFailures
// fruitless reopens.
func TestWatchProgressResumableStopsOnFinalErrors(t *testing.T) {
	_, c := serveProgress(t, script{[]int{1}, status.Error(codes.InvalidArgument, "bad interval")})
	seen, causes, err := watch(t, c, 99, 0)
	if status.Code(err) != codes.InvalidArgument || !slices.Equal(seen, []int{1}) || len(causes) != 0 {
		t.Fatalf("Run = %v after %v, resumed %v: want INVALID_ARGUMENT, no resume", err, seen, causes)
	}

	refused := script{nil, status.Error(codes.ResourceExhausted, "too many watchers")}
	fake, c := serveProgress(t, refused, refused, refused, refused)
	_, causes, err = watch(t, c, 99, 3)
	if status.Code(errors.Unwrap(err)) != codes.ResourceExhausted || fake.streamsOpened() != 3 || len(causes) != 2 {
		t.Fatalf("Run = %v after %d streams, resumed %v: want RESOURCE_EXHAUSTED after 3 streams", err, fake.streamsOpened(), causes)
	}

	// The caller's context ends it too.
	_, c = serveProgress(t) // streams that never send
	ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	err = userclient.WatchProgressResumable(ctx, c.Projection, &userv1.WatchProgressRequest{},
		func(*userv1.ProgressSnapshot) error { return nil })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run = %v, want the context's error", err)
	}
}
