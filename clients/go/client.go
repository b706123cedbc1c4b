// Package userclient connects to user-service: the generated stubs live in
// gen/user/v1 (package userv1); this package adds a connection with the
// service's defaults (retry policy, request ids, keepalive, optional
// balancing), a resumable progress watch and helpers for error details.
package userclient

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// ServiceConfig is the default gRPC service config of a connection made by
// Dial or DialBalanced: the retry policy both clients share
// (clients/shared/service_config.json, copied here by scripts/gen-clients;
// clients/shared/README.md says why each code is retried). In short:
// CreateUser retries UNAVAILABLE and ABORTED, GetUser also
// DEADLINE_EXCEEDED (the service's own wait bound; gRPC never retries past
// the caller's deadline), ProjectionService UNAVAILABLE; up to 5 attempts
// (4 for progress) with exponential backoff.
//
// Retrying CreateUser is safe because every CreateUser carries a request id:
// Dial installs an interceptor that fills an empty request_id before the
// first attempt, so every retry resends the same one (see ReportRequestID).
//
// Calls the server never processed need no policy: grpc-go retries them
// transparently (a refused stream, a GOAWAY from an instance that drains).
// A server-streaming call (WatchProgress) is retried only until the server
// starts answering it; WatchProgressResumable reopens it after that.
//
//go:embed service_config.json
var ServiceConfig string

// keepaliveParams: the client pings a connection that has calls in flight
// after 30 s without traffic, and drops it when the ping is not answered in
// 10 s, so a stream over a dead peer (a crashed host, a proxy or NAT that
// forgot the flow) fails with UNAVAILABLE instead of hanging. The service
// pings every connection every 30 s too (HTTP2_KEEPALIVE_INTERVAL) and
// accepts client pings at this rate; an idle connection sends none
// (PermitWithoutStream false), so idle clients cost the server nothing. A
// variable only so that a test can shorten it.
var keepaliveParams = keepalive.ClientParameters{
	Time:                30 * time.Second,
	Timeout:             10 * time.Second,
	PermitWithoutStream: false,
}

// Client bundles the stubs of everything the service serves over one
// connection.
type Client struct {
	Conn       *grpc.ClientConn
	Users      userv1.UserServiceClient
	Projection userv1.ProjectionServiceClient
	Health     healthpb.HealthClient
}

// Dial makes a plaintext connection to addr (host:port, or any gRPC target)
// with the service's defaults:
//
//   - ServiceConfig as the default service config (the retry policy);
//   - an interceptor that gives every CreateUser without a request_id a
//     fresh UUID, the same for all its retries (see ReportRequestID);
//   - keepalive pings on connections with calls in flight (30 s, 10 s).
//
// It does not connect until the first call. More options (TLS credentials,
// interceptors, a service config) may be passed; later ones win, and extra
// unary interceptors run inside the request id one.
func Dial(addr string, opts ...grpc.DialOption) (*Client, error) {
	return dial(addr, nil, opts)
}

// DialBalanced is Dial for several instances: calls are spread over all of
// them with the round_robin policy (one connection per instance, each call
// to the next ready one) instead of pick_first's single connection. target
// is either
//
//   - a comma-separated list of addresses, "10.0.0.1:50051,10.0.0.2:50051"
//     (a fixed list, given to gRPC by a manual resolver), or
//   - a gRPC target whose resolver names every instance, e.g.
//     "dns:///user-service.internal:50051" (every A/AAAA record; grpc-go
//     re-resolves when a connection drops).
//
// Use Dial, not this, when the address is a proxy or a Kubernetes Service
// that balances already: round_robin over one address is pick_first.
func DialBalanced(target string, opts ...grpc.DialOption) (*Client, error) {
	sc, err := withLoadBalancing(ServiceConfig, "round_robin")
	if err != nil {
		return nil, fmt.Errorf("service config: %w", err)
	}
	extra := []grpc.DialOption{grpc.WithDefaultServiceConfig(sc)}
	if strings.Contains(target, ",") {
		var addrs []resolver.Address
		for a := range strings.SplitSeq(target, ",") {
			a = strings.TrimSpace(a)
			if a == "" {
				return nil, fmt.Errorf("connect to %q: empty address in the list", target)
			}
			addrs = append(addrs, resolver.Address{Addr: a})
		}
		// The builder belongs to this connection only (WithResolvers), so
		// the scheme registers nothing globally. The target's endpoint, the
		// first address, becomes the calls' :authority.
		r := manual.NewBuilderWithScheme("userclient-list")
		r.InitialState(resolver.State{Addresses: addrs})
		extra = append(extra, grpc.WithResolvers(r))
		target = r.Scheme() + ":///" + addrs[0].Addr
	}
	return dial(target, extra, opts)
}

func dial(target string, extra, opts []grpc.DialOption) (*Client, error) {
	all := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(ServiceConfig),
		grpc.WithKeepaliveParams(keepaliveParams),
		// A unary interceptor runs once per call, outside grpc-go's retries
		// (they happen inside the ClientConn): the id it picks is the id of
		// every attempt.
		grpc.WithChainUnaryInterceptor(fillRequestID),
	}
	all = append(all, extra...)
	all = append(all, opts...)
	conn, err := grpc.NewClient(target, all...)
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", target, err)
	}
	return &Client{
		Conn:       conn,
		Users:      userv1.NewUserServiceClient(conn),
		Projection: userv1.NewProjectionServiceClient(conn),
		Health:     healthpb.NewHealthClient(conn),
	}, nil
}

// withLoadBalancing returns the service config with its loadBalancingConfig
// set to policy, the rest (the retry policy) unchanged.
func withLoadBalancing(config, policy string) (string, error) {
	var sc map[string]any
	if err := json.Unmarshal([]byte(config), &sc); err != nil {
		return "", err
	}
	sc["loadBalancingConfig"] = []any{map[string]any{policy: map[string]any{}}}
	b, err := json.Marshal(sc)
	return string(b), err
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
