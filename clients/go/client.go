// Package userclient connects to user-service: the generated stubs live in
// gen/user/v1 (package userv1); this package adds a connection with the
// service's retry policy and helpers for its error details.
package userclient

import (
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// ServiceConfig is the default gRPC service config of a connection made by
// Dial: calls to user.v1 services that fail with UNAVAILABLE are retried, up to
// 4 attempts in all, with exponential backoff.
//
// UNAVAILABLE is what the service answers when Kafka or Redis cannot be
// reached, and what grpc-go reports when a connection drops. Retrying
// CreateUser is safe only with a request_id (the service then answers a
// retry with the first answer); a retry resends the same message, so set
// request_id on every CreateUser (userctl does).
//
// Calls the server never processed need no policy: grpc-go retries them
// transparently, for every method (CreateUser included), when the stream was
// refused or a GOAWAY says the server did not process it (e.g. an instance
// that stops accepting calls while it drains on SIGTERM). This policy adds the
// calls that did fail with UNAVAILABLE. A server-streaming call
// (WatchProgress) is retried only until the server starts answering it.
const ServiceConfig = `{
  "methodConfig": [{
    "name": [
      {"service": "user.v1.UserService"},
      {"service": "user.v1.ProjectionService"}
    ],
    "retryPolicy": {
      "maxAttempts": 4,
      "initialBackoff": "0.1s",
      "maxBackoff": "1s",
      "backoffMultiplier": 2,
      "retryableStatusCodes": ["UNAVAILABLE"]
    }
  }]
}`

// Client bundles the stubs of everything the service serves over one
// connection.
type Client struct {
	Conn       *grpc.ClientConn
	Users      userv1.UserServiceClient
	Projection userv1.ProjectionServiceClient
	Health     healthpb.HealthClient
}

// Dial makes a plaintext connection to addr (host:port) with ServiceConfig as
// its default service config. It does not connect until the first call. More
// options (TLS credentials, interceptors) may be passed; later ones win.
func Dial(addr string, opts ...grpc.DialOption) (*Client, error) {
	all := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(ServiceConfig),
	}, opts...)
	conn, err := grpc.NewClient(addr, all...)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", addr, err)
	}
	return &Client{
		Conn:       conn,
		Users:      userv1.NewUserServiceClient(conn),
		Projection: userv1.NewProjectionServiceClient(conn),
		Health:     healthpb.NewHealthClient(conn),
	}, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.Conn.Close() }

// FieldViolations returns the google.rpc.BadRequest field violations carried
// by a gRPC error (the service sends them with INVALID_ARGUMENT), or nil.
func FieldViolations(err error) []*errdetails.BadRequest_FieldViolation {
	st, ok := status.FromError(err)
	if !ok {
		return nil
	}
	var out []*errdetails.BadRequest_FieldViolation
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			out = append(out, br.GetFieldViolations()...)
		}
	}
	return out
}

// Describe renders a gRPC error for people: its code and message, then one
// line per field violation, e.g.
//
//	InvalidArgument: invalid request: name: must not be empty
//	  name: must not be empty
func Describe(err error) string {
	if err == nil {
		return ""
	}
	st, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	var b strings.Builder
	fmt.Fprintf(&b, "%s: %s", st.Code(), st.Message())
	for _, v := range FieldViolations(err) {
		fmt.Fprintf(&b, "\n  %s: %s", v.GetField(), v.GetDescription())
	}
	return b.String()
}
