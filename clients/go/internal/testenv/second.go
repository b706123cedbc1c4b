package testenv

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	userclient "github.com/user-service/user-service/clients/go"
)

// Instance is another instance of the service under test, started by the
// test itself.
type Instance struct {
	Addr string

	cmd      *exec.Cmd
	exited   chan struct{} // closed once the process is reaped
	waitErr  error
	log      *bytes.Buffer
	logMu    *sync.Mutex
	stopOnce sync.Once
	stopErr  error
}

// SecondInstance starts one more instance of the service under test: the same
// binary and settings as the one scripts/with-service started (its topic,
// consumer group, Redis key prefix, read from its environment), on a free
// loopback port. Its projector is off, so that it does not join the consumer
// group: the other tests, running meanwhile, see no rebalance; it still
// serves every call (reads and progress from the shared Redis and Kafka, and
// creates, whose verdict the first instance's projector applies). It is
// stopped with SIGTERM when the test ends, if the test did not Stop it.
func SecondInstance(t testing.TB) *Instance {
	t.Helper()
	Addr(t) // fails with the explanation when not run via scripts/with-service
	bin, env := firstInstance(t)
	addr := freeAddr(t)
	env = append(env,
		"LISTEN_ADDR="+addr,
		"METRICS_ADDR=127.0.0.1:0",
		"PROJECTOR_ENABLED=false",
		"DRAIN_GRACE=0s",
	)
	in := &Instance{Addr: addr, exited: make(chan struct{}), log: new(bytes.Buffer), logMu: new(sync.Mutex)}
	in.cmd = exec.Command(bin)
	in.cmd.Env = env
	w := &lockedWriter{mu: in.logMu, b: in.log}
	in.cmd.Stdout, in.cmd.Stderr = w, w
	if err := in.cmd.Start(); err != nil {
		t.Fatalf("start a second instance (%s): %v", bin, err)
	}
	go func() { in.waitErr = in.cmd.Wait(); close(in.exited) }()
	t.Cleanup(func() {
		if err := in.Stop(); err != nil {
			t.Errorf("second instance: %v\n%s", err, in.Log())
		}
	})

	c, err := userclient.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		resp, err := c.Health.Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return in
		}
		select {
		case <-in.exited:
			t.Fatalf("the second instance exited at start (%v):\n%s", in.waitErr, in.Log())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the second instance is not SERVING after 60s (%v, %v):\n%s", resp.GetStatus(), err, in.Log())
		}
	}
}

// Stop sends SIGTERM (the service drains: NOT_SERVING, streams ended, a
// GOAWAY) and waits until it exits; an exit status other than 0 is an error,
// as in scripts/with-service. Later calls return the first call's answer.
func (in *Instance) Stop() error {
	in.stopOnce.Do(func() {
		_ = in.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-in.exited:
			in.stopErr = in.waitErr
		case <-time.After(30 * time.Second):
			_ = in.cmd.Process.Kill()
			<-in.exited
			in.stopErr = errors.New("did not exit within 30s of SIGTERM; killed")
		}
	})
	return in.stopErr
}

// Log is what the instance printed so far.
func (in *Instance) Log() string {
	in.logMu.Lock()
	defer in.logMu.Unlock()
	return in.log.String()
}

type lockedWriter struct {
	mu *sync.Mutex
	b  *bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// firstInstance finds the binary and the environment of the instance that
// scripts/with-service started (USER_SERVICE_PID): on Linux from /proc, which
// also gives its REDIS_KEY_PREFIX, which the script does not export.
// Without /proc: USER_SERVICE_BIN or the debug build, and this process's
// environment (which has KAFKA_BROKER_URL and REDIS_SERVER_URL) with the
// settings the script derives from the topic's name.
func firstInstance(t testing.TB) (bin string, env []string) {
	t.Helper()
	pid := os.Getenv("USER_SERVICE_PID")
	if pid != "" {
		if exe, err := os.Readlink("/proc/" + pid + "/exe"); err == nil && filepath.Base(exe) == "user-service" {
			bin = exe
		}
		if raw, err := os.ReadFile("/proc/" + pid + "/environ"); err == nil {
			for kv := range strings.SplitSeq(string(raw), "\x00") {
				if kv != "" {
					env = append(env, kv)
				}
			}
		}
	}
	if bin == "" {
		bin = findBinary(t)
	}
	if env == nil {
		topic, group := Topic(), Group()
		name, ok := strings.CutSuffix(topic, "-users")
		if !ok || group == "" {
			t.Fatalf("cannot tell the service's settings: no /proc/%s/environ and USER_SERVICE_TOPIC=%q, USER_SERVICE_GROUP=%q", pid, topic, group)
		}
		env = append(os.Environ(), "KAFKA_TOPIC="+topic, "KAFKA_CONSUMER_GROUP="+group, "REDIS_KEY_PREFIX="+name+":")
	}
	return bin, env
}

// findBinary is the service's debug build, as scripts/with-service builds it.
func findBinary(t testing.TB) string {
	t.Helper()
	var candidates []string
	if b := os.Getenv("USER_SERVICE_BIN"); b != "" {
		candidates = append(candidates, b)
	}
	if d := os.Getenv("CARGO_TARGET_DIR"); d != "" {
		candidates = append(candidates, filepath.Join(d, "debug", "user-service"))
	}
	if home, err := os.UserHomeDir(); err == nil {
		candidates = append(candidates, filepath.Join(home, ".cache", "user-service", "target", "debug", "user-service"))
	}
	for _, c := range candidates {
		if st, err := os.Stat(c); err == nil && !st.IsDir() {
			return c
		}
	}
	t.Fatalf("no user-service binary for a second instance; tried %q (set USER_SERVICE_BIN)", candidates)
	return ""
}

// freeAddr is a loopback address nothing listens on right now.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return "127.0.0.1:" + strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
}
