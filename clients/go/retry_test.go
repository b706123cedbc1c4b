package userclient_test

// The retry policy of userclient.ServiceConfig, against an in-process fake
// server (no live service needed).

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// flaky fails the first `failures` calls with `code`, then answers.
type flaky struct {
	userv1.UnimplementedUserServiceServer
	failures int32
	code     codes.Code
	calls    atomic.Int32
}

func (f *flaky) CreateUser(_ context.Context, req *userv1.CreateUserRequest) (*userv1.CreateUserResponse, error) {
	if f.calls.Add(1) <= f.failures {
		return nil, status.Error(f.code, "try again")
	}
	return &userv1.CreateUserResponse{User: &userv1.User{Id: 7, Name: req.GetName()}}, nil
}

func serveFake(t *testing.T, srv userv1.UserServiceServer) *userclient.Client {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	userv1.RegisterUserServiceServer(s, srv)
	go func() { _ = s.Serve(lis) }()
	t.Cleanup(s.Stop)
	c, err := userclient.Dial(lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func TestRetryPolicy(t *testing.T) {
	for _, tc := range []struct {
		name      string
		failures  int32
		code      codes.Code
		wantCode  codes.Code
		wantCalls int32
	}{
		{"unavailable twice, then ok", 2, codes.Unavailable, codes.OK, 3},
		{"unavailable 3 times, then ok", 3, codes.Unavailable, codes.OK, 4},
		{"unavailable past maxAttempts", 10, codes.Unavailable, codes.Unavailable, 4},
		{"other codes are not retried", 10, codes.Internal, codes.Internal, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &flaky{failures: tc.failures, code: tc.code}
			c := serveFake(t, f)
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			_, err := c.Users.CreateUser(ctx, &userv1.CreateUserRequest{Name: "n", RequestId: "r"})
			if got := status.Code(err); got != tc.wantCode {
				t.Fatalf("code %s (%v), want %s", got, err, tc.wantCode)
			}
			if got := f.calls.Load(); got != tc.wantCalls {
				t.Fatalf("%d calls reached the server, want %d", got, tc.wantCalls)
			}
		})
	}
}
