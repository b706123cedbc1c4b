// Command userctl talks to user-service from the shell.
//
//	userctl [-addr HOST:PORT] create -name N -email E [-id N] [-request-id R]
//	userctl [-addr HOST:PORT] get -id N [-partition P -offset O] [-timeout 5s]
//	userctl [-addr HOST:PORT] progress [-interval 1s] [-count N]
//	userctl [-addr HOST:PORT] health [-service S]
//
// The address defaults to $USER_SERVICE_ADDR, else 127.0.0.1:50051. Calls are
// retried per userclient.ServiceConfig; create sends a fresh UUID as its
// request id unless -request-id is given; progress reopens its stream when an
// instance drains or the connection drops. Exit status: 0 on success, 1 when a
// call fails (or health is not SERVING), 2 on bad usage.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	userclient "github.com/user-service/user-service/clients/go"
	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

const defaultAddr = "127.0.0.1:50051"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// errUsage marks a command-line mistake (exit status 2); flag has printed why.
var errUsage = errors.New("usage")

// run is userctl without the process around it: args exclude the program name.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("userctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "", "service address `host:port` (default: $USER_SERVICE_ADDR, else "+defaultAddr+")")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage:")
		for _, name := range []string{"create", "get", "progress", "health"} {
			fmt.Fprintf(stderr, "  userctl [-addr HOST:PORT] %s\n", synopsis[name])
		}
		fmt.Fprintln(stderr, "\nglobal flags:")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return 2
	}

	cmds := map[string]func(context.Context, *userclient.Client, []string, io.Writer, io.Writer) error{
		"create":   cmdCreate,
		"get":      cmdGet,
		"progress": cmdProgress,
		"health":   cmdHealth,
	}
	cmd, ok := cmds[fs.Arg(0)]
	if !ok {
		fmt.Fprintf(stderr, "userctl: unknown command %q\n", fs.Arg(0))
		fs.Usage()
		return 2
	}

	if *addr == "" {
		*addr = envOr("USER_SERVICE_ADDR", defaultAddr)
	}
	c, err := userclient.Dial(*addr)
	if err != nil {
		fmt.Fprintf(stderr, "userctl: %v\n", err)
		return 1
	}
	defer c.Close()

	switch err := cmd(ctx, c, fs.Args()[1:], stdout, stderr); {
	case err == nil:
		return 0
	case errors.Is(err, errUsage):
		return 2
	case errors.Is(err, flag.ErrHelp):
		return 0
	default:
		fmt.Fprintf(stderr, "userctl: %s\n", userclient.Describe(err))
		return 1
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

// synopsis is each subcommand's usage line.
var synopsis = map[string]string{
	"create":   "create -name N -email E [-id N] [-request-id R] [-timeout 10s]",
	"get":      "get -id N [-partition P -offset O] [-timeout 5s]",
	"progress": "progress [-interval 1s] [-count N] [-group G] [-topic T]",
	"health":   "health [-service S] [-timeout 5s]",
}

// parse parses a subcommand's flags; positional arguments are refused.
func parse(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: userctl [-addr HOST:PORT] %s\n", synopsis[fs.Name()])
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "userctl %s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		fs.Usage()
		return errUsage
	}
	return nil
}

func usageError(fs *flag.FlagSet, stderr io.Writer, format string, a ...any) error {
	fmt.Fprintf(stderr, "userctl %s: %s\n", fs.Name(), fmt.Sprintf(format, a...))
	fs.Usage()
	return errUsage
}

func cmdCreate(ctx context.Context, c *userclient.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("create", flag.ContinueOnError)
	name := fs.String("name", "", "the user's name (required)")
	email := fs.String("email", "", "the user's email (required)")
	id := fs.Int64("id", 0, "a client-chosen id (default: the service assigns one)")
	requestID := fs.String("request-id", "", "idempotency key (default: a fresh UUID, so that retries are safe)")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline of the call, retries included")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	req := &userv1.CreateUserRequest{Name: *name, Email: *email, RequestId: *requestID}
	// Unset -id means "assign one"; an explicit -id 0 is sent as is (and refused).
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "id" {
			req.Id = id
		}
	})
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	// Without -request-id the client sends a fresh UUID, the same on every
	// retry; it is printed so that the create can be rerun with it.
	var sent string
	resp, err := c.Users.CreateUser(ctx, req, userclient.ReportRequestID(&sent))
	if err != nil {
		if sent != "" && outcomeUnknown(err) {
			fmt.Fprintf(stderr, "userctl: the user may have been created; rerun with -request-id %s to retry safely\n", sent)
		}
		return err
	}
	printUser(stdout, resp.GetUser())
	p := resp.GetPosition()
	fmt.Fprintf(stdout, "position: partition=%d offset=%d\n", p.GetPartition(), p.GetOffset())
	fmt.Fprintf(stdout, "request_id: %s\n", sent)
	return nil
}

func cmdGet(ctx context.Context, c *userclient.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("get", flag.ContinueOnError)
	id := fs.Int64("id", 0, "the user's id (required)")
	partition := fs.Int("partition", 0, "with -offset: wait until the read model has applied this position")
	offset := fs.Int64("offset", 0, "with -partition: the position's offset (from create)")
	timeout := fs.Duration("timeout", 5*time.Second, "deadline of the call; bounds the wait for the position")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if !set["id"] {
		return usageError(fs, stderr, "-id is required")
	}
	if set["partition"] != set["offset"] {
		return usageError(fs, stderr, "-partition and -offset go together")
	}
	req := &userv1.GetUserRequest{Id: *id}
	if set["offset"] {
		req.MinPosition = &userv1.Position{Partition: int32(*partition), Offset: *offset}
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, err := c.Users.GetUser(ctx, req)
	if err != nil {
		return err
	}
	printUser(stdout, resp.GetUser())
	return nil
}

func cmdProgress(ctx context.Context, c *userclient.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("progress", flag.ContinueOnError)
	interval := fs.Duration("interval", time.Second, "time between snapshots (100ms to 1h)")
	count := fs.Int("count", 0, "stop after this many snapshots (0: until interrupted)")
	group := fs.String("group", "", "consumer group (default: the service's projector group)")
	topic := fs.String("topic", "", "topic (default: the service's event topic)")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	if *count < 0 {
		return usageError(fs, stderr, "-count must not be negative")
	}
	req := &userv1.WatchProgressRequest{Group: *group, Topic: *topic, Interval: durationpb.New(*interval)}
	fmt.Fprintf(stdout, "%-12s %9s %10s %10s %8s %-8s %s\n",
		"TIME", "PARTITION", "COMMITTED", "LOG_END", "LAG", "STATUS", "OWNER")
	// The stream outlives a drain, a restart or a dropped connection: it is
	// reopened, and a snapshot already printed is not printed again.
	w := userclient.ProgressWatcher{
		Client:  c.Projection,
		Request: req,
		OnResume: func(cause error, wait time.Duration) {
			why := "the service ended it"
			if !errors.Is(cause, io.EOF) {
				why = userclient.Describe(cause)
			}
			fmt.Fprintf(stderr, "userctl: progress stream ended (%s); reopening in %v\n", why, wait.Round(time.Millisecond))
		},
	}
	n := 0
	err := w.Run(ctx, func(s *userv1.ProgressSnapshot) error {
		printSnapshot(stdout, s)
		n++
		if *count > 0 && n >= *count {
			return errEnough
		}
		return nil
	})
	switch {
	case errors.Is(err, errEnough):
		return nil
	case ctx.Err() != nil:
		return nil // interrupted
	default:
		return err
	}
}

// errEnough stops the progress watch once -count snapshots are printed.
var errEnough = errors.New("enough snapshots")

func cmdHealth(ctx context.Context, c *userclient.Client, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	service := fs.String("service", "", `service name ("" is the server as a whole)`)
	timeout := fs.Duration("timeout", 5*time.Second, "deadline of the call")
	if err := parse(fs, args, stderr); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	resp, err := c.Health.Check(ctx, &healthpb.HealthCheckRequest{Service: *service})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, resp.GetStatus())
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return fmt.Errorf("not serving: %s", resp.GetStatus())
	}
	return nil
}

func printUser(w io.Writer, u *userv1.User) {
	fmt.Fprintf(w, "id: %d\nname: %s\nemail: %s\ncreate_time: %s\n",
		u.GetId(), u.GetName(), u.GetEmail(), formatTime(u.GetCreateTime(), time.RFC3339Nano))
}

// printSnapshot prints one line per partition.
func printSnapshot(w io.Writer, s *userv1.ProgressSnapshot) {
	when := formatTime(s.GetTime(), "15:04:05.000")
	for _, p := range s.GetPartitions() {
		committed := "-"
		if p.CommittedOffset != nil {
			committed = fmt.Sprint(p.GetCommittedOffset())
		}
		fmt.Fprintf(w, "%-12s %9d %10s %10d %8d %-8s %s\n",
			when, p.GetPartition(), committed, p.GetLogEndOffset(), p.GetLag(),
			statusName(p.GetStatus()), ownerName(p.GetOwner()))
	}
}

func statusName(s userv1.PartitionStatus) string {
	return strings.TrimPrefix(s.String(), "PARTITION_STATUS_")
}

func ownerName(o *userv1.PartitionOwner) string {
	if o == nil {
		return "-"
	}
	return fmt.Sprintf("%s (%s)", o.GetMemberId(), strings.TrimPrefix(o.GetHost(), "/"))
}

func formatTime(t *timestamppb.Timestamp, layout string) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().Local().Format(layout)
}

// outcomeUnknown: the create may have reached the log although the call
// failed, so only a retry with the same request id is safe.
func outcomeUnknown(err error) bool {
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Aborted, codes.Canceled:
		return true
	}
	return false
}
