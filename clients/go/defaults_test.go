package userclient_test

// The defaults of userclient.Dial and its helpers against the live service
// (run via scripts/with-service): request ids, balancing over two instances,
// resumable progress across a dropped connection and a drain, keepalive.

import (
	"context"
	"errors"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
	"github.com/user-service/user-service/clients/go/internal/testenv"
)

// TestCreateWithoutRequestIDGetsOne: a CreateUser without a request id
// succeeds, and the service knows the id the client chose: a create with
// that id answers the first answer. The same message sent again is another
// call, with another id: another user.
func TestCreateWithoutRequestIDGetsOne(t *testing.T) {
	c := testenv.Client(t)
	ctx := testenv.Context(t)
	u := testenv.Unique()
	req := &userv1.CreateUserRequest{Name: "NoID " + u, Email: u + "@example.com"}

	var sent string
	first, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&sent))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := uuid.Parse(sent); err != nil {
		t.Fatalf("the create was sent with request id %q, not a UUID", sent)
	}
	again, err := c.Users.CreateUser(ctx, &userv1.CreateUserRequest{Name: req.Name, Email: req.Email, RequestId: sent})
	if err != nil {
		t.Fatalf("create with the chosen request id: %v", err)
	}
	if !proto.Equal(again, first) {
		t.Fatalf("a create with request id %s answered %v; the first create answered %v", sent, again, first)
	}

	var next string
	second, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&next))
	if err != nil {
		t.Fatal(err)
	}
	if next == sent || second.GetUser().GetId() == first.GetUser().GetId() {
		t.Fatalf("a second call of the same message: request id %s (first %s), user %d (first %d)",
			next, sent, second.GetUser().GetId(), first.GetUser().GetId())
	}
}

// TestDialBalancedSpreadsCalls: DialBalanced over two live instances (the
// second started here) sends calls to both, in turn; a dns:/// target works.
func TestDialBalancedSpreadsCalls(t *testing.T) {
	first := testenv.Addr(t)
	second := testenv.SecondInstance(t).Addr
	c, err := userclient.DialBalanced(first + "," + second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := testenv.Context(t)
	created := create(t, c, nil)
	get := &userv1.GetUserRequest{Id: created.GetUser().GetId(), MinPosition: created.GetPosition()}
	call := func() string {
		t.Helper()
		var p peer.Peer
		if _, err := c.Users.GetUser(ctx, get, grpc.Peer(&p)); err != nil {
			t.Fatalf("GetUser: %v", err)
		}
		return p.Addr.String()
	}

	// Until both connections are up, round_robin uses those that are.
	seen := map[string]bool{}
	for deadline := time.Now().Add(10 * time.Second); len(seen) < 2; {
		seen[call()] = true
		if time.Now().After(deadline) {
			t.Fatalf("after 10s every call still went to %v", seen)
		}
	}
	counts := map[string]int{}
	for range 20 {
		counts[call()]++
	}
	t.Logf("20 calls: %v", counts)
	if len(counts) != 2 || counts[first] < 8 || counts[second] < 8 {
		t.Fatalf("20 calls landed %v, want about 10 on each of %s and %s", counts, first, second)
	}

	// A resolver target (one address here: the point is that it is accepted).
	d, err := userclient.DialBalanced("dns:///" + second)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.Users.GetUser(ctx, get); err != nil {
		t.Fatalf("GetUser over dns:///%s: %v", second, err)
	}
	if _, err := userclient.DialBalanced(first + ",," + second); err == nil {
		t.Fatal("an empty address in the list was accepted")
	}
}

// progressLog collects what a ProgressWatcher delivers and why it resumed.
type progressLog struct {
	mu      sync.Mutex
	times   []time.Time
	resumes []string
}

func (l *progressLog) watcher(c *userclient.Client) *userclient.ProgressWatcher {
	return &userclient.ProgressWatcher{
		Client:     c.Projection,
		Request:    &userv1.WatchProgressRequest{Interval: durationpb.New(200 * time.Millisecond)},
		MinBackoff: 50 * time.Millisecond,
		OnResume: func(cause error, _ time.Duration) {
			why := "EOF"
			if !errors.Is(cause, io.EOF) {
				why = status.Code(cause).String()
			}
			l.mu.Lock()
			l.resumes = append(l.resumes, why)
			l.mu.Unlock()
		},
	}
}

// check: the snapshots came in strictly increasing time (none twice), and
// the stream was reopened.
func (l *progressLog) check(t *testing.T) {
	t.Helper()
	l.mu.Lock()
	defer l.mu.Unlock()
	t.Logf("%d snapshots, resumed after %v", len(l.times), l.resumes)
	for i := 1; i < len(l.times); i++ {
		if !l.times[i].After(l.times[i-1]) {
			t.Errorf("snapshot %d taken at %s, after one taken at %s: delivered twice or out of order",
				i, l.times[i].Format(time.RFC3339Nano), l.times[i-1].Format(time.RFC3339Nano))
		}
	}
	if len(l.resumes) == 0 {
		t.Errorf("the stream was never reopened")
	}
}

// TestWatchProgressResumesAfterDroppedConnection: a live progress stream
// whose connection is cut (through a proxy) goes on over a new connection,
// without delivering a snapshot twice.
func TestWatchProgressResumesAfterDroppedConnection(t *testing.T) {
	p := testenv.NewProxy(t, testenv.Addr(t))
	c, err := userclient.Dial(p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var l progressLog
	err = l.watcher(c).Run(testenv.Context(t), func(s *userv1.ProgressSnapshot) error {
		checkSnapshot(t, s)
		l.mu.Lock()
		l.times = append(l.times, s.GetTime().AsTime())
		n := len(l.times)
		l.mu.Unlock()
		switch n {
		case 3, 6:
			p.Cut() // right after a snapshot: the reopened stream's first is that one again
		case 9:
			return errStop
		}
		return nil
	})
	if !errors.Is(err, errStop) {
		t.Fatalf("Run: %v", err)
	}
	l.check(t)
	if p.Accepted() < 3 {
		t.Errorf("%d connections through the proxy, want a new one after each cut", p.Accepted())
	}
}

// TestWatchProgressResumesAfterDrain: a live progress stream on an instance
// that is stopped (SIGTERM: it drains, ends the stream, says GOAWAY) goes on
// on another instance, without delivering a snapshot twice.
func TestWatchProgressResumesAfterDrain(t *testing.T) {
	second := testenv.SecondInstance(t)
	p := testenv.NewProxy(t, second.Addr)
	c, err := userclient.Dial(p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var l progressLog
	stopped := make(chan error, 1)
	err = l.watcher(c).Run(testenv.Context(t), func(s *userv1.ProgressSnapshot) error {
		checkSnapshot(t, s)
		l.mu.Lock()
		l.times = append(l.times, s.GetTime().AsTime())
		n := len(l.times)
		l.mu.Unlock()
		switch n {
		case 3:
			// New connections go to the first instance from now on, as a
			// load balancer's would once this one drains.
			p.SetUpstream(testenv.Addr(t))
			go func() { stopped <- second.Stop() }()
		case 8:
			return errStop
		}
		return nil
	})
	if !errors.Is(err, errStop) {
		t.Fatalf("Run: %v", err)
	}
	if err := <-stopped; err != nil {
		t.Fatalf("the second instance did not stop cleanly: %v\n%s", err, second.Log())
	}
	l.check(t)
}

// TestKeepaliveDropsDeadConnection: a stream over a connection that goes
// silent (a proxy that drops every byte and closes nothing) fails with
// UNAVAILABLE once a keepalive ping goes unanswered, instead of hanging until
// the caller's deadline. Dial's keepalive is shortened to 10 s + 1 s here
// (grpc-go's floor); the wiring is what is under test.
func TestKeepaliveDropsDeadConnection(t *testing.T) {
	t.Parallel() // waits ~11 s
	restore := userclient.SetKeepaliveForTest(10*time.Second, time.Second)
	p := testenv.NewProxy(t, testenv.Addr(t))
	c, err := userclient.Dial(p.Addr())
	restore()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 25*time.Second)
	defer cancel()
	stream, err := c.Projection.WatchProgress(ctx, &userv1.WatchProgressRequest{Interval: durationpb.New(200 * time.Millisecond)})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	p.Freeze()
	frozen := time.Now()
	for {
		_, err := stream.Recv()
		if err == nil {
			continue // snapshots already in flight
		}
		took := time.Since(frozen).Round(100 * time.Millisecond)
		if status.Code(err) != codes.Unavailable || took > 20*time.Second {
			t.Fatalf("after %v of silence: %v, want UNAVAILABLE within ~11s", took, err)
		}
		t.Logf("dead connection found after %v: %v", took, err)
		return
	}
}
