package userclient_test

// The client-side defaults that need a server to misbehave on cue: the retry
// policy of userclient.ServiceConfig and the request id interceptor, against
// an in-process fake server (no live service needed).

import (
	"context"
	"encoding/json"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// flaky fails the first `failures` calls of every method with `code`, then
// answers; it records the request id of every CreateUser attempt.
type flaky struct {
	userv1.UnimplementedUserServiceServer
	userv1.UnimplementedProjectionServiceServer
	failures int
	code     codes.Code

	mu         sync.Mutex
	calls      int
	requestIDs []string
}

func (f *flaky) attempt() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.calls <= f.failures {
		return status.Error(f.code, "try again")
	}
	return nil
}

func (f *flaky) attempts() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func (f *flaky) CreateUser(_ context.Context, req *userv1.CreateUserRequest) (*userv1.CreateUserResponse, error) {
	f.mu.Lock()
	f.requestIDs = append(f.requestIDs, req.GetRequestId())
	f.mu.Unlock()
	if err := f.attempt(); err != nil {
		return nil, err
	}
	return &userv1.CreateUserResponse{User: &userv1.User{Id: 7, Name: req.GetName()}}, nil
}

func (f *flaky) GetUser(_ context.Context, req *userv1.GetUserRequest) (*userv1.GetUserResponse, error) {
	if err := f.attempt(); err != nil {
		return nil, err
	}
	return &userv1.GetUserResponse{User: &userv1.User{Id: req.GetId()}}, nil
}

func (f *flaky) GetProgress(context.Context, *userv1.GetProgressRequest) (*userv1.GetProgressResponse, error) {
	if err := f.attempt(); err != nil {
		return nil, err
	}
	return &userv1.GetProgressResponse{}, nil
}

// serveFake serves f on a loopback port and dials it with userclient.Dial.
func serveFake(t *testing.T, f *flaky) *userclient.Client {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	userv1.RegisterUserServiceServer(s, f)
	userv1.RegisterProjectionServiceServer(s, f)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	c, err := userclient.Dial(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestRetryPolicy: which codes each method retries, and how often, per the
// shared service config (clients/shared/README.md says why).
func TestRetryPolicy(t *testing.T) {
	create := func(ctx context.Context, c *userclient.Client) error {
		_, err := c.Users.CreateUser(ctx, &userv1.CreateUserRequest{Name: "n", RequestId: "r"})
		return err
	}
	get := func(ctx context.Context, c *userclient.Client) error {
		_, err := c.Users.GetUser(ctx, &userv1.GetUserRequest{Id: 1})
		return err
	}
	progress := func(ctx context.Context, c *userclient.Client) error {
		_, err := c.Projection.GetProgress(ctx, &userv1.GetProgressRequest{})
		return err
	}
	for _, tc := range []struct {
		name      string
		call      func(context.Context, *userclient.Client) error
		failures  int
		code      codes.Code
		wantCode  codes.Code
		wantCalls int
	}{
		{"CreateUser: unavailable twice, then ok", create, 2, codes.Unavailable, codes.OK, 3},
		{"CreateUser: aborted twice, then ok", create, 2, codes.Aborted, codes.OK, 3},
		{"CreateUser: unavailable past maxAttempts", create, 10, codes.Unavailable, codes.Unavailable, 5},
		{"CreateUser: deadline exceeded is not retried", create, 10, codes.DeadlineExceeded, codes.DeadlineExceeded, 1},
		{"CreateUser: internal is not retried", create, 10, codes.Internal, codes.Internal, 1},
		{"CreateUser: already exists is not retried", create, 10, codes.AlreadyExists, codes.AlreadyExists, 1},
		{"GetUser: deadline exceeded 3 times, then ok", get, 3, codes.DeadlineExceeded, codes.OK, 4},
		{"GetUser: aborted once, then ok", get, 1, codes.Aborted, codes.OK, 2},
		{"GetUser: unavailable past maxAttempts", get, 10, codes.Unavailable, codes.Unavailable, 5},
		{"GetUser: not found is not retried", get, 10, codes.NotFound, codes.NotFound, 1},
		{"GetUser: resource exhausted is not retried", get, 10, codes.ResourceExhausted, codes.ResourceExhausted, 1},
		{"GetProgress: unavailable 3 times, then ok", progress, 3, codes.Unavailable, codes.OK, 4},
		{"GetProgress: unavailable past maxAttempts", progress, 10, codes.Unavailable, codes.Unavailable, 4},
		{"GetProgress: deadline exceeded is not retried", progress, 10, codes.DeadlineExceeded, codes.DeadlineExceeded, 1},
		{"GetProgress: aborted is not retried", progress, 10, codes.Aborted, codes.Aborted, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel() // each waits out its backoff (up to ~1.5 s)
			f := &flaky{failures: tc.failures, code: tc.code}
			c := serveFake(t, f)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			err := tc.call(ctx, c)
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("code %s (%v), want %s", got, err, tc.wantCode)
			}
			if got := f.attempts(); got != tc.wantCalls {
				t.Fatalf("%d attempts reached the server, want %d", got, tc.wantCalls)
			}
		})
	}
}

// TestServiceConfigIsTheSharedFile: the embedded config is the shared file's
// copy, loaded as is (a syntax error would fail every Dial).
func TestServiceConfigIsTheSharedFile(t *testing.T) {
	var sc struct {
		MethodConfig []struct {
			RetryPolicy struct{ RetryableStatusCodes []string }
		}
	}
	if err := json.Unmarshal([]byte(userclient.ServiceConfig), &sc); err != nil {
		t.Fatalf("ServiceConfig is not JSON: %v", err)
	}
	if len(sc.MethodConfig) != 3 || !slices.Contains(sc.MethodConfig[0].RetryPolicy.RetryableStatusCodes, "ABORTED") {
		t.Fatalf("ServiceConfig is not clients/shared/service_config.json: %s", userclient.ServiceConfig)
	}
}

// TestRequestIDIsTheSameOnEveryRetry: a CreateUser without a request id is
// sent with a fresh UUID, the same on each of its attempts (the first two
// fail with UNAVAILABLE and grpc-go retries them), reported by
// ReportRequestID; the caller's message is left alone; the next call gets
// another id; a caller's own id is sent as is.
func TestRequestIDIsTheSameOnEveryRetry(t *testing.T) {
	f := &flaky{failures: 2, code: codes.Unavailable}
	c := serveFake(t, f)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	req := &userv1.CreateUserRequest{Name: "n", Email: "n@example.com"}
	var sent string
	if _, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&sent)); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	ids := slices.Clone(f.requestIDs)
	f.mu.Unlock()
	if len(ids) != 3 {
		t.Fatalf("%d attempts, want 3 (two UNAVAILABLE, then ok): %q", len(ids), ids)
	}
	if _, err := uuid.Parse(ids[0]); err != nil {
		t.Fatalf("the first attempt's request id %q is not a UUID: %v", ids[0], err)
	}
	if ids[1] != ids[0] || ids[2] != ids[0] {
		t.Fatalf("the attempts carried request ids %q, want one id for all", ids)
	}
	if sent != ids[0] {
		t.Fatalf("ReportRequestID gave %q, the server got %q", sent, ids[0])
	}
	if req.GetRequestId() != "" {
		t.Fatalf("the caller's message was changed: request_id %q", req.GetRequestId())
	}

	// The same message again is another call: another id.
	var next string
	if _, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&next)); err != nil {
		t.Fatal(err)
	}
	if next == "" || next == sent {
		t.Fatalf("the second call's id %q, the first's %q: want a fresh one", next, sent)
	}

	// The caller's own id is kept and reported.
	var own string
	req.RequestId = "mine-1"
	if _, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&own)); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	got := f.requestIDs[len(f.requestIDs)-1]
	f.mu.Unlock()
	if got != "mine-1" || own != "mine-1" {
		t.Fatalf("sent %q, reported %q, want the caller's mine-1", got, own)
	}
}
