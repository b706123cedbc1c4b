package userclient_test

// These tests run against a live user-service: run them through
// scripts/with-service (see internal/testenv), which starts a fresh instance
// with its own topic, group and key prefix and sets USER_SERVICE_ADDR.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
	"github.com/user-service/user-service/clients/go/internal/testenv"
)

// create makes a user with a unique name and email and a request id.
func create(t *testing.T, c *userclient.Client, id *int64) *userv1.CreateUserResponse {
	t.Helper()
	u := testenv.Unique()
	resp, err := c.Users.CreateUser(testenv.Context(t), &userv1.CreateUserRequest{
		Id:        id,
		Name:      "Go " + u,
		Email:     u + "@example.com",
		RequestId: "go-test-" + u,
	})
	if err != nil {
		t.Fatalf("CreateUser: %v", err)
	}
	return resp
}

func wantCode(t *testing.T, err error, want codes.Code) *status.Status {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want %s", want)
	}
	st, ok := status.FromError(err)
	if !ok {
		t.Fatalf("not a gRPC status error: %v", err)
	}
	if st.Code() != want {
		t.Fatalf("got %s (%q), want %s", st.Code(), st.Message(), want)
	}
	return st
}

func TestCreateThenGetWithPosition(t *testing.T) {
	c := testenv.Client(t)
	ctx := testenv.Context(t)
	created := create(t, c, nil)
	u := created.GetUser()
	if u.GetId() <= 0 || u.GetCreateTime() == nil || created.GetPosition() == nil {
		t.Fatalf("CreateUser answered %v", created)
	}
	n := testenv.Partitions(t)
	if p := created.GetPosition(); p.GetPartition() < 0 || int(p.GetPartition()) >= n || p.GetOffset() < 0 {
		t.Fatalf("position %v is not in the service's %d-partition topic", p, n)
	}

	// With the position token the first read sees the write: no polling.
	callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got, err := c.Users.GetUser(callCtx, &userv1.GetUserRequest{Id: u.GetId(), MinPosition: created.GetPosition()})
	if err != nil {
		t.Fatalf("GetUser with the position: %v", err)
	}
	if !proto.Equal(got.GetUser(), u) {
		t.Fatalf("GetUser = %v, want %v", got.GetUser(), u)
	}
}

func TestGetWithoutPositionEventually(t *testing.T) {
	c := testenv.Client(t)
	ctx := testenv.Context(t)
	u := create(t, c, nil).GetUser()

	// Without the token the read model catches up on its own time.
	deadline := time.Now().Add(10 * time.Second)
	for attempt := 1; ; attempt++ {
		got, err := c.Users.GetUser(ctx, &userv1.GetUserRequest{Id: u.GetId()})
		if err == nil {
			if !proto.Equal(got.GetUser(), u) {
				t.Fatalf("GetUser = %v, want %v", got.GetUser(), u)
			}
			t.Logf("visible after %d attempt(s)", attempt)
			return
		}
		if status.Code(err) != codes.NotFound {
			t.Fatalf("GetUser: %v", err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("user %d still NOT_FOUND after 10s", u.GetId())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestGetUnknownUserIsNotFound(t *testing.T) {
	c := testenv.Client(t)
	_, err := c.Users.GetUser(testenv.Context(t), &userv1.GetUserRequest{Id: testenv.RandomID()})
	wantCode(t, err, codes.NotFound)

	// Also once the read model has applied a position: the answer is final.
	created := create(t, c, nil)
	_, err = c.Users.GetUser(testenv.Context(t), &userv1.GetUserRequest{
		Id: testenv.RandomID(), MinPosition: created.GetPosition(),
	})
	wantCode(t, err, codes.NotFound)
}

func TestCreateInvalidArgumentHasFieldViolations(t *testing.T) {
	c := testenv.Client(t)
	_, err := c.Users.CreateUser(testenv.Context(t), &userv1.CreateUserRequest{Name: "", Email: "nope"})
	st := wantCode(t, err, codes.InvalidArgument)

	var fields []string
	for _, d := range st.Details() {
		br, ok := d.(*errdetails.BadRequest)
		if !ok {
			t.Fatalf("unexpected detail %T: %v", d, d)
		}
		for _, v := range br.GetFieldViolations() {
			if v.GetDescription() == "" {
				t.Errorf("violation of %q has no description", v.GetField())
			}
			fields = append(fields, v.GetField())
		}
	}
	if !slices.Equal(fields, []string{"name", "email"}) {
		t.Fatalf("field violations on %q, want [name email] (details %v)", fields, st.Details())
	}
	// The helper reads the same thing.
	if n := len(userclient.FieldViolations(err)); n != 2 {
		t.Fatalf("FieldViolations found %d, want 2", n)
	}
}

func TestGetUserInvalidArgument(t *testing.T) {
	c := testenv.Client(t)
	_, err := c.Users.GetUser(testenv.Context(t), &userv1.GetUserRequest{Id: 0})
	wantCode(t, err, codes.InvalidArgument)
	_, err = c.Users.GetUser(testenv.Context(t), &userv1.GetUserRequest{
		Id: 1, MinPosition: &userv1.Position{Partition: -1, Offset: -1},
	})
	wantCode(t, err, codes.InvalidArgument)
	var fields []string
	for _, v := range userclient.FieldViolations(err) {
		fields = append(fields, v.GetField())
	}
	if !slices.Equal(fields, []string{"min_position.partition", "min_position.offset"}) {
		t.Fatalf("field violations on %q", fields)
	}
}

func TestCreateReusedIDIsAlreadyExists(t *testing.T) {
	c := testenv.Client(t)
	id := testenv.RandomID()
	first := create(t, c, &id)
	if first.GetUser().GetId() != id {
		t.Fatalf("asked for id %d, got %d", id, first.GetUser().GetId())
	}
	// Another request (other request id, other fields) for the same id.
	u := testenv.Unique()
	_, err := c.Users.CreateUser(testenv.Context(t), &userv1.CreateUserRequest{
		Id: &id, Name: "Other " + u, Email: u + "@example.org", RequestId: "go-test-other-" + u,
	})
	wantCode(t, err, codes.AlreadyExists)
	// And without a request id.
	_, err = c.Users.CreateUser(testenv.Context(t), &userv1.CreateUserRequest{
		Id: &id, Name: "Other " + u, Email: u + "@example.org",
	})
	wantCode(t, err, codes.AlreadyExists)
}

func TestCreateRetryWithRequestIDIsIdempotent(t *testing.T) {
	c := testenv.Client(t)
	ctx := testenv.Context(t)
	u := testenv.Unique()
	req := &userv1.CreateUserRequest{Name: "Retry " + u, Email: u + "@example.com", RequestId: "go-retry-" + u}

	first, err := c.Users.CreateUser(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		again, err := c.Users.CreateUser(ctx, req)
		if err != nil {
			t.Fatalf("retry %d: %v", i+1, err)
		}
		if !proto.Equal(again, first) {
			t.Fatalf("retry %d answered %v, first answer was %v", i+1, again, first)
		}
	}

	// The same key with other fields is refused, naming request_id.
	other := proto.Clone(req).(*userv1.CreateUserRequest)
	other.Name = "Someone else"
	_, err = c.Users.CreateUser(ctx, other)
	wantCode(t, err, codes.InvalidArgument)
	if v := userclient.FieldViolations(err); len(v) != 1 || v[0].GetField() != "request_id" {
		t.Fatalf("field violations %v, want one on request_id", v)
	}

	// The answer's position is real: the read model has the user there.
	callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	got, err := c.Users.GetUser(callCtx, &userv1.GetUserRequest{Id: first.GetUser().GetId(), MinPosition: first.GetPosition()})
	if err != nil {
		t.Fatal(err)
	}
	if !proto.Equal(got.GetUser(), first.GetUser()) {
		t.Fatalf("GetUser = %v, want %v", got.GetUser(), first.GetUser())
	}
}

// A position the log has not reached is refused at once: no wait could see
// it applied.
func TestGetUserPastTheLogEndIsOutOfRange(t *testing.T) {
	c := testenv.Client(t)
	created := create(t, c, nil)
	_, err := c.Users.GetUser(testenv.Context(t), &userv1.GetUserRequest{
		Id:          created.GetUser().GetId(),
		MinPosition: &userv1.Position{Partition: created.GetPosition().GetPartition(), Offset: 1e12},
	})
	st := wantCode(t, err, codes.OutOfRange)
	if !strings.Contains(st.Message(), "past the end") {
		t.Fatalf("message %q does not say why", st.Message())
	}
}

func TestGetProgress(t *testing.T) {
	c := testenv.Client(t)
	resp, err := c.Projection.GetProgress(testenv.Context(t), &userv1.GetProgressRequest{})
	if err != nil {
		t.Fatal(err)
	}
	s := resp.GetSnapshot()
	checkSnapshot(t, s)
	if g := testenv.Group(); g != "" && s.GetGroup() != g {
		t.Errorf("group %q, want the service's %q", s.GetGroup(), g)
	}
	if tp := testenv.Topic(); tp != "" && s.GetTopic() != tp {
		t.Errorf("topic %q, want the service's %q", s.GetTopic(), tp)
	}

	// A partition filter (the topic's last partition), and one the topic lacks.
	n := int32(testenv.Partitions(t))
	resp, err = c.Projection.GetProgress(testenv.Context(t), &userv1.GetProgressRequest{Partitions: []int32{n - 1}})
	if err != nil {
		t.Fatal(err)
	}
	if ps := resp.GetSnapshot().GetPartitions(); len(ps) != 1 || ps[0].GetPartition() != n-1 {
		t.Fatalf("filtered to partition %d, got %v", n-1, ps)
	}
	_, err = c.Projection.GetProgress(testenv.Context(t), &userv1.GetProgressRequest{Partitions: []int32{n}})
	wantCode(t, err, codes.InvalidArgument)
	// Another group: not the service's own, not on its allowlist.
	_, err = c.Projection.GetProgress(testenv.Context(t), &userv1.GetProgressRequest{Group: "no-such-group-" + testenv.Unique()})
	wantCode(t, err, codes.PermissionDenied)
}

// checkSnapshot checks what holds for every snapshot of the service's own group.
func checkSnapshot(t *testing.T, s *userv1.ProgressSnapshot) {
	t.Helper()
	if s.GetTime() == nil || s.GetGroup() == "" || s.GetTopic() == "" || s.GetTotals() == nil {
		t.Fatalf("incomplete snapshot %v", s)
	}
	ps := s.GetPartitions()
	if n := testenv.Partitions(t); len(ps) != n {
		t.Fatalf("%d partitions, the topic has %d: %v", len(ps), n, ps)
	}
	for i, p := range ps {
		if p.GetPartition() != int32(i) {
			t.Errorf("partition %d at index %d", p.GetPartition(), i)
		}
		if p.GetLag() < 0 || p.GetLogEndOffset() < p.GetLogStartOffset() {
			t.Errorf("partition %d: lag %d, log %d..%d", p.GetPartition(), p.GetLag(), p.GetLogStartOffset(), p.GetLogEndOffset())
		}
	}
}

func TestWatchProgress(t *testing.T) {
	c := testenv.Client(t)
	ctx, cancel := context.WithCancel(testenv.Context(t))
	defer cancel()
	stream, err := c.Projection.WatchProgress(ctx, &userv1.WatchProgressRequest{Interval: durationpb.New(200 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	var times []string
	for range 4 {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("after %d snapshots: %v", len(times), err)
		}
		checkSnapshot(t, resp.GetSnapshot())
		times = append(times, resp.GetSnapshot().GetTime().AsTime().Format("15:04:05.000"))
	}
	t.Logf("4 snapshots in %v, taken at %v", time.Since(start).Round(time.Millisecond), times)
	cancel()
	if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("after cancel: %v", err)
	}
}

func TestWatchProgressBadIntervalIsInvalidArgument(t *testing.T) {
	c := testenv.Client(t)
	for _, d := range []time.Duration{50 * time.Millisecond, -time.Second, 2 * time.Hour} {
		stream, err := c.Projection.WatchProgress(testenv.Context(t), &userv1.WatchProgressRequest{Interval: durationpb.New(d)})
		if err == nil {
			_, err = stream.Recv() // a streaming call's status arrives with the first read
		}
		wantCode(t, err, codes.InvalidArgument)
		if v := userclient.FieldViolations(err); len(v) != 1 || v[0].GetField() != "interval" {
			t.Errorf("interval %v: violations %v, want one on interval", d, v)
		}
	}
}

func TestHealth(t *testing.T) {
	c := testenv.Client(t)
	for _, svc := range []string{"", "user.v1.UserService"} {
		resp, err := c.Health.Check(testenv.Context(t), &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			t.Fatalf("Check(%q): %v", svc, err)
		}
		if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("Check(%q) = %s", svc, resp.GetStatus())
		}
	}
	_, err := c.Health.Check(testenv.Context(t), &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	wantCode(t, err, codes.NotFound)

	// Watch on an unknown name streams SERVICE_UNKNOWN (the spec), not an error.
	ctx, cancel := context.WithTimeout(testenv.Context(t), 5*time.Second)
	defer cancel()
	w, err := c.Health.Watch(ctx, &healthpb.HealthCheckRequest{Service: "no.such.Service"})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := w.Recv()
	if err != nil {
		t.Fatalf("Watch(unknown): %v", err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVICE_UNKNOWN {
		t.Fatalf("Watch(unknown) = %s", resp.GetStatus())
	}
}

func TestDescribe(t *testing.T) {
	c := testenv.Client(t)
	_, err := c.Users.CreateUser(testenv.Context(t), &userv1.CreateUserRequest{Name: "", Email: "nope"})
	got := userclient.Describe(err)
	for _, want := range []string{"InvalidArgument: ", "\n  name: ", "\n  email: "} {
		if !strings.Contains(got, want) {
			t.Errorf("Describe = %q, missing %q", got, want)
		}
	}
	if d := userclient.Describe(io.EOF); d != "EOF" {
		t.Errorf("Describe(io.EOF) = %q", d)
	}
	if d := userclient.Describe(fmt.Errorf("wrapped: %w", errors.New("x"))); d != "wrapped: x" {
		t.Errorf("Describe(plain) = %q", d)
	}
}
