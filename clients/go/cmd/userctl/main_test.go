package main

// userctl against the live service (run via scripts/with-service): its run
// function in-process, and the built binary as a user would run it.

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/user-service/user-service/clients/go/internal/testenv"
)

// userctl runs userctl's main path in-process against the live service.
func userctl(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	code = run(ctx, append([]string{"-addr", testenv.Addr(t)}, args...), &out, &errOut)
	return code, out.String(), errOut.String()
}

var (
	idLine       = regexp.MustCompile(`(?m)^id: (\d+)$`)
	positionLine = regexp.MustCompile(`(?m)^position: partition=(\d+) offset=(\d+)$`)
	// Without -request-id the client sends a fresh UUID.
	uuidRequestID = regexp.MustCompile(`(?m)^request_id: [0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
)

func TestCreateThenGet(t *testing.T) {
	u := testenv.Unique()
	code, out, errOut := userctl(t, "create", "-name", "Ctl "+u, "-email", u+"@example.com")
	if code != 0 {
		t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
	}
	id, pos := idLine.FindStringSubmatch(out), positionLine.FindStringSubmatch(out)
	if id == nil || pos == nil || !uuidRequestID.MatchString(out) {
		t.Fatalf("create printed:\n%s", out)
	}
	code, got, errOut := userctl(t, "get", "-id", id[1], "-partition", pos[1], "-offset", pos[2])
	if code != 0 {
		t.Fatalf("get: exit %d\n%s%s", code, got, errOut)
	}
	for _, want := range []string{"id: " + id[1] + "\n", "name: Ctl " + u + "\n", "email: " + u + "@example.com\n"} {
		if !strings.Contains(got, want) {
			t.Errorf("get printed %q, missing %q", got, want)
		}
	}
}

func TestCreateWithIDAndRequestID(t *testing.T) {
	u := testenv.Unique()
	id := testenv.RandomID()
	args := []string{"create", "-id", itoa(id), "-name", "Ctl " + u, "-email", u + "@example.com", "-request-id", "ctl-" + u}
	code, first, errOut := userctl(t, args...)
	if code != 0 {
		t.Fatalf("create: exit %d\n%s", code, errOut)
	}
	if !strings.Contains(first, "id: "+itoa(id)+"\n") || !strings.Contains(first, "request_id: ctl-"+u+"\n") {
		t.Fatalf("create printed:\n%s", first)
	}
	// A retry with the request id prints the same answer.
	if code, again, errOut := userctl(t, args...); code != 0 || again != first {
		t.Fatalf("retry: exit %d\n%s%s\nfirst answer:\n%s", code, again, errOut, first)
	}
	// Another request for the id is refused.
	code, _, errOut = userctl(t, "create", "-id", itoa(id), "-name", "x", "-email", "x@example.com")
	if code != 1 || !strings.Contains(errOut, "AlreadyExists") {
		t.Fatalf("exit %d, stderr %q", code, errOut)
	}
}

func TestInvalidArgumentShowsFieldViolations(t *testing.T) {
	code, out, errOut := userctl(t, "create", "-name", "", "-email", "nope")
	if code != 1 || out != "" {
		t.Fatalf("exit %d, stdout %q", code, out)
	}
	for _, want := range []string{"InvalidArgument: ", "\n  name: must not be empty\n", "\n  email: "} {
		if !strings.Contains(errOut, want) {
			t.Errorf("stderr %q, missing %q", errOut, want)
		}
	}
}

func TestGetErrors(t *testing.T) {
	code, _, errOut := userctl(t, "get", "-id", itoa(testenv.RandomID()))
	if code != 1 || !strings.Contains(errOut, "NotFound") {
		t.Errorf("unknown id: exit %d, stderr %q", code, errOut)
	}
	code, _, errOut = userctl(t, "get", "-id", "1", "-partition", "0", "-offset", "1000000000000")
	if code != 1 || !strings.Contains(errOut, "OutOfRange") {
		t.Errorf("a position past the log end: exit %d, stderr %q", code, errOut)
	}
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"get"},
		{"get", "-id", "1", "-offset", "3"},
		{"get", "-id", "1", "extra"},
		{"progress", "-count", "-1"},
		{"create", "-bogus"},
	} {
		// Usage errors are found before any call: no service needed.
		var out, errOut bytes.Buffer
		code := run(t.Context(), append([]string{"-addr", "127.0.0.1:1"}, args...), &out, &errOut)
		if code != 2 || !strings.Contains(errOut.String(), "usage:") {
			t.Errorf("%q: exit %d, stderr %q", args, code, errOut.String())
		}
	}
}

func TestProgress(t *testing.T) {
	code, out, errOut := userctl(t, "progress", "-interval", "200ms", "-count", "3")
	if code != 0 {
		t.Fatalf("exit %d\n%s%s", code, out, errOut)
	}
	n := testenv.Partitions(t)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 1+3*n || !strings.HasPrefix(lines[0], "TIME") {
		t.Fatalf("want a header and 3 snapshots of the topic's %d partitions, got:\n%s", n, out)
	}
	row := regexp.MustCompile(`^\S+ +(\d+) +(\d+|-) +\d+ +\d+ +(OK|LAGGING|STALLED|STOPPED) +\S`)
	for i, l := range lines[1:] {
		m := row.FindStringSubmatch(l)
		if m == nil || m[1] != strconv.Itoa(i%n) {
			t.Errorf("odd row %q (want partition %d)", l, i%n)
		}
	}

	code, _, errOut = userctl(t, "progress", "-interval", "50ms", "-count", "1")
	if code != 1 || !strings.Contains(errOut, "InvalidArgument") || !strings.Contains(errOut, "\n  interval: ") {
		t.Fatalf("bad interval: exit %d, stderr %q", code, errOut)
	}
}

// TestProgressResumes: `progress` goes on when its connection is cut
// (through a proxy), and prints no snapshot twice.
func TestProgressResumes(t *testing.T) {
	p := testenv.NewProxy(t, testenv.Addr(t))
	go func() {
		time.Sleep(700 * time.Millisecond) // a few snapshots in
		p.Cut()
	}()
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	code := run(ctx, []string{"-addr", p.Addr(), "progress", "-interval", "200ms", "-count", "8"}, &out, &errOut)
	if code != 0 {
		t.Fatalf("exit %d\n%s%s", code, out.String(), errOut.String())
	}
	if !strings.Contains(errOut.String(), "progress stream ended (Unavailable: ") || !strings.Contains(errOut.String(), "reopening in ") {
		t.Fatalf("stderr %q does not say the stream was reopened", errOut.String())
	}
	n := testenv.Partitions(t)
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")[1:]
	if len(lines) != 8*n {
		t.Fatalf("want 8 snapshots of %d partitions, got:\n%s", n, out.String())
	}
	var times []string
	for i := 0; i < len(lines); i += n {
		times = append(times, strings.Fields(lines[i])[0])
	}
	for i := 1; i < len(times); i++ {
		if times[i] == times[i-1] {
			t.Fatalf("the snapshot of %s printed twice (snapshots at %v)", times[i], times)
		}
	}
}

func TestHealth(t *testing.T) {
	for _, svc := range []string{"", "user.v1.UserService"} {
		code, out, errOut := userctl(t, "health", "-service", svc)
		if code != 0 || out != "SERVING\n" {
			t.Errorf("health %q: exit %d, %q %q", svc, code, out, errOut)
		}
	}
	code, _, errOut := userctl(t, "health", "-service", "no.such.Service")
	if code != 1 || !strings.Contains(errOut, "NotFound") {
		t.Errorf("unknown service: exit %d, %q", code, errOut)
	}
}

// TestBinary builds userctl and runs it as a process: flags, exit codes and
// USER_SERVICE_ADDR as the default address.
func TestBinary(t *testing.T) {
	addr := testenv.Addr(t)
	bin := filepath.Join(t.TempDir(), "userctl")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	exe := func(args ...string) (int, string, string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = append(os.Environ(), "USER_SERVICE_ADDR="+addr)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return code, out.String(), errOut.String()
	}

	u := testenv.Unique()
	code, out, errOut := exe("create", "-name", "Bin "+u, "-email", u+"@example.com")
	if code != 0 {
		t.Fatalf("create: exit %d\n%s%s", code, out, errOut)
	}
	id, pos := idLine.FindStringSubmatch(out), positionLine.FindStringSubmatch(out)
	if id == nil || pos == nil {
		t.Fatalf("create printed:\n%s", out)
	}
	code, out, errOut = exe("-addr", addr, "get", "-id", id[1], "-partition", pos[1], "-offset", pos[2], "-timeout", "5s")
	if code != 0 || !strings.Contains(out, "name: Bin "+u+"\n") {
		t.Fatalf("get: exit %d\n%s%s", code, out, errOut)
	}
	if code, out, _ := exe("health"); code != 0 || out != "SERVING\n" {
		t.Fatalf("health: exit %d, %q", code, out)
	}
	if code, _, errOut := exe("create", "-name", "", "-email", "nope"); code != 1 || !strings.Contains(errOut, "  name: ") {
		t.Fatalf("invalid create: exit %d, %q", code, errOut)
	}
	if code, _, _ := exe("get"); code != 2 {
		t.Fatalf("get without -id: exit %d, want 2", code)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
