package userclient

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// WatchProgressResumable calls handle with each new snapshot of a
// WatchProgress stream and keeps the stream going: when it ends (an instance
// that drains ends it cleanly, a restart or a dropped connection ends it with
// UNAVAILABLE) it is reopened with backoff, on whichever instance the
// connection reaches then. gRPC's retry policy cannot do this: it retries a
// stream only until its first answer.
//
// A snapshot is delivered only if it was taken after the last one delivered
// (its time field): a reopened stream starts with the instance's latest
// snapshot, often the very one handle has seen, and a snapshot of a lagging
// instance is no news either.
//
// It returns handle's error as soon as handle returns one (return a sentinel
// to stop), ctx.Err() once ctx is done, and the stream's error when it is
// not worth reopening (INVALID_ARGUMENT, PERMISSION_DENIED, ...). See
// ProgressWatcher for the backoff and a hook to log the reopens.
func WatchProgressResumable(ctx context.Context, client userv1.ProjectionServiceClient,
	req *userv1.WatchProgressRequest, handle func(*userv1.ProgressSnapshot) error) error {
	w := ProgressWatcher{Client: client, Request: req}
	return w.Run(ctx, handle)
}

// ProgressWatcher is WatchProgressResumable with its settings; the zero
// values are the defaults.
type ProgressWatcher struct {
	Client  userv1.ProjectionServiceClient
	Request *userv1.WatchProgressRequest

	// MinBackoff and MaxBackoff bound the wait before a reopen (default
	// 100 ms and 5 s, with jitter): it doubles after each reopen that
	// delivered nothing new, and is back to MinBackoff once one does.
	MinBackoff, MaxBackoff time.Duration
	// MaxFailures is how many reopens in a row may deliver nothing new
	// before Run gives up and returns the last stream's error (0: never).
	MaxFailures int
	// OnResume, if set, is called before each reopen with why the stream
	// ended (io.EOF when the server ended it cleanly) and the wait.
	OnResume func(cause error, wait time.Duration)
}

// Run watches until handle returns an error, ctx is done, or the stream
// fails in a way a reopen would not mend; see WatchProgressResumable.
func (w *ProgressWatcher) Run(ctx context.Context, handle func(*userv1.ProgressSnapshot) error) error {
	minWait, maxWait := w.MinBackoff, w.MaxBackoff
	if minWait <= 0 {
		minWait = 100 * time.Millisecond
	}
	if maxWait < minWait {
		maxWait = max(5*time.Second, minWait)
	}
	var last time.Time // when the last delivered snapshot was taken
	backoff, failures := minWait, 0
	for {
		delivered, cause, err := w.watchOnce(ctx, &last, handle)
		if err != nil {
			return err
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if delivered {
			backoff, failures = minWait, 0
		} else {
			failures++
			if w.MaxFailures > 0 && failures >= w.MaxFailures {
				return fmt.Errorf("progress stream: %d streams in a row delivered nothing: %w", failures, cause)
			}
		}
		wait := backoff/2 + rand.N(backoff/2+1) // jitter: watchers cut together do not come back together
		if w.OnResume != nil {
			w.OnResume(cause, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(2*backoff, maxWait)
	}
}

// watchOnce runs one stream to its end. delivered tells whether handle got
// a new snapshot; cause is why a stream worth reopening ended; err ends Run.
func (w *ProgressWatcher) watchOnce(ctx context.Context, last *time.Time,
	handle func(*userv1.ProgressSnapshot) error) (delivered bool, cause, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // releases the stream whatever ends it
	stream, err := w.Client.WatchProgress(ctx, w.Request)
	if err != nil {
		return false, err, resumeOrFail(ctx, err)
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			return delivered, err, resumeOrFail(ctx, err)
		}
		s := resp.GetSnapshot()
		if t := s.GetTime(); t != nil {
			taken := t.AsTime()
			if !taken.After(*last) {
				continue // seen already (or older): not news
			}
			*last = taken
		}
		delivered = true
		if err := handle(s); err != nil {
			return true, nil, err
		}
	}
}

// resumeOrFail is nil for a stream end that a reopen may mend, else the
// error Run returns.
func resumeOrFail(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err() // the caller's context: not the stream's fault
	}
	if errors.Is(err, io.EOF) {
		return nil // the server ended it cleanly: it drains
	}
	switch status.Code(err) {
	case codes.Unavailable, // a restart, a GOAWAY, a dropped connection, a dependency away
		codes.ResourceExhausted, // the instance's watcher budget: back off and retry
		codes.Aborted,
		codes.Canceled, codes.DeadlineExceeded: // cut by the server or a proxy, not by ctx
		return nil
	}
	return err
}
