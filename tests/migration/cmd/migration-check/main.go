// migration-check: the steps of scripts/check-go-migration that talk to the
// services, Kafka and Redis (docs/migrating-from-go.md). Each subcommand
// exits non-zero with the reason when its check fails.
//
//	migration-check create-on-peer -addr A -n 200 -twice 3 -out peer.json
//	migration-check check-ours -addr A -acks peer.json -n 50 -run R -out ours.json
//	migration-check check-peer-redis -redis H:P -db 1 -acks ours.json
//	migration-check metrics -url http://H:P/metrics -superseded 3
//	migration-check dead-letters -kafka H:P -topic T.dlq
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	kafka "github.com/segmentio/kafka-go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	userv1 "github.com/user-service/user-service/clients/go/gen/user/v1"
)

// Ack is a user as a service acknowledged it: what a later read must show.
type Ack struct {
	ID         int64     `json:"id"`
	Name       string    `json:"name"`
	Email      string    `json:"email"`
	CreateTime time.Time `json:"create_time"`
}

// UserInfo is the article's user record, as the Go service keeps it in Redis.
type UserInfo struct {
	ID         int64     `json:"id"`
	Name       string    `json:"name"`
	Email      string    `json:"email"`
	CreateTime time.Time `json:"create_time"`
}

func main() {
	log.SetFlags(0)
	log.SetPrefix("[migration-check] ")
	if len(os.Args) < 2 {
		log.Fatal("usage: migration-check create-on-peer|check-ours|check-peer-redis|metrics|dead-letters [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	var err error
	switch cmd {
	case "create-on-peer":
		err = createOnPeer(args)
	case "check-ours":
		err = checkOurs(args)
	case "check-peer-redis":
		err = checkPeerRedis(args)
	case "metrics":
		err = checkMetrics(args)
	case "dead-letters":
		err = deadLetters(args)
	default:
		err = fmt.Errorf("unknown subcommand %q", cmd)
	}
	if err != nil {
		log.Fatalf("%s: %v", cmd, err)
	}
}

func dial(addr string) (userv1.UserServiceClient, func()) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	return userv1.NewUserServiceClient(conn), func() { conn.Close() }
}

func ack(u *userv1.User) Ack {
	return Ack{ID: u.GetId(), Name: u.GetName(), Email: u.GetEmail(), CreateTime: u.GetCreateTime().AsTime()}
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

func readAcks(path string) ([]Ack, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var acks []Ack
	return acks, json.Unmarshal(b, &acks)
}

// createOnPeer creates users on the Go service, in parallel (its writer, at
// the article's 1 s batch timeout, batches concurrent calls), and writes down
// those it acknowledged. The last `twice` ids are created again with other
// fields, which the Go service allows (it overwrites): its read model keeps
// the last, this service the first event in the id's partition.
func createOnPeer(args []string) error {
	fs := flag.NewFlagSet("create-on-peer", flag.ExitOnError)
	addr := fs.String("addr", "", "the Go service's gRPC address")
	n := fs.Int("n", 200, "users to create")
	twice := fs.Int("twice", 3, "of them, how many to create again with other fields")
	out := fs.String("out", "", "where to write the acknowledged users (JSON)")
	fs.Parse(args)
	client, closeConn := dial(*addr)
	defer closeConn()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()

	type result struct {
		ack Ack
		err error
	}
	create := func(req *userv1.CreateUserRequest) result {
		r, err := client.CreateUser(ctx, req)
		if err != nil {
			return result{err: err}
		}
		return result{ack: ack(r.GetUser())}
	}
	results := make([]result, *n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 50)
	for i := range *n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			results[i] = create(&userv1.CreateUserRequest{
				Name:  fmt.Sprintf("go user %d", i),
				Email: fmt.Sprintf("g%d@example.com", i),
			})
		}()
	}
	wg.Wait()
	var acks []Ack
	failed := 0
	for _, r := range results {
		if r.err != nil {
			failed++
			log.Printf("a create failed: %v", r.err)
			continue
		}
		acks = append(acks, r.ack)
	}
	// Written again, with the id the Go service gave, after the first write.
	var again []Ack
	for i := 0; i < *twice && i < len(acks); i++ {
		first := acks[len(acks)-1-i]
		r := create(&userv1.CreateUserRequest{
			Id:    &first.ID,
			Name:  first.Name + " (written again)",
			Email: "again." + first.Email,
		})
		if r.err != nil {
			return fmt.Errorf("writing user %d again: %v", first.ID, r.err)
		}
		again = append(again, r.ack)
	}
	log.Printf("the Go service acknowledged %d of %d users (%d failed), %d of them written twice", len(acks), *n, failed, len(again))
	if len(acks) == 0 {
		return errors.New("no user acknowledged")
	}
	return writeJSON(*out, map[string][]Ack{"users": acks, "again": again})
}

// checkOurs reads every user the Go service acknowledged through this
// service, then creates new users on it and writes them down.
func checkOurs(args []string) error {
	fs := flag.NewFlagSet("check-ours", flag.ExitOnError)
	addr := fs.String("addr", "", "this service's gRPC address")
	path := fs.String("acks", "", "create-on-peer's output")
	n := fs.Int("n", 50, "new users to create on this service")
	run := fs.String("run", "", "a name unique to this run (request ids)")
	out := fs.String("out", "", "where to write this service's acknowledged users (JSON)")
	wait := fs.Duration("wait", 2*time.Minute, "how long a user may take to appear (the projector re-homing)")
	fs.Parse(args)
	b, err := os.ReadFile(*path)
	if err != nil {
		return err
	}
	var peer map[string][]Ack
	if err := json.Unmarshal(b, &peer); err != nil {
		return err
	}
	// An id written twice may read back as either write: which one was
	// first in the id's partition is decided when it is re-homed.
	versions := map[int64][]Ack{}
	for _, a := range append(peer["users"], peer["again"]...) {
		versions[a.ID] = append(versions[a.ID], a)
	}
	client, closeConn := dial(*addr)
	defer closeConn()
	deadline := time.Now().Add(*wait)
	readable, notYet := 0, 0
	for id, want := range versions {
		var got *userv1.User
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			r, err := client.GetUser(ctx, &userv1.GetUserRequest{Id: id})
			cancel()
			if err == nil {
				got = r.GetUser()
				break
			}
			code := status.Code(err)
			if (code == codes.NotFound || code == codes.Unavailable) && time.Now().Before(deadline) {
				notYet++
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return fmt.Errorf("user %d, acknowledged by the Go service: %v", id, err)
		}
		if !matchesOne(ack(got), want) {
			return fmt.Errorf("user %d reads %+v, the Go service acknowledged %+v", id, ack(got), want)
		}
		readable++
	}
	log.Printf("%d of %d users the Go service acknowledged read back through GetUser, fields and creation time (to the ms) as acknowledged (%d reads retried while the projector caught up)", readable, len(versions), notYet)

	var acks []Ack
	for i := range *n {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		r, err := client.CreateUser(ctx, &userv1.CreateUserRequest{
			Name:      fmt.Sprintf("rust user %d", i),
			Email:     fmt.Sprintf("r%d@example.com", i),
			RequestId: fmt.Sprintf("%s-%d", *run, i),
		})
		cancel()
		if err != nil {
			return fmt.Errorf("creating a user on this service: %v", err)
		}
		acks = append(acks, ack(r.GetUser()))
	}
	log.Printf("this service created %d users", len(acks))
	return writeJSON(*out, acks)
}

// matchesOne: the user is one of the acknowledged writes of its id, its
// creation time to the millisecond (what this service keeps).
func matchesOne(got Ack, want []Ack) bool {
	for _, w := range want {
		if got.ID == w.ID && got.Name == w.Name && got.Email == w.Email &&
			got.CreateTime.Equal(w.CreateTime.Truncate(time.Millisecond)) {
			return true
		}
	}
	return false
}

// checkPeerRedis waits until the Go service's read model (its Redis DB,
// `user_<id>`) holds every user this service created, each with its fields
// and its creation time: the Go consumer read this service's events whole.
func checkPeerRedis(args []string) error {
	fs := flag.NewFlagSet("check-peer-redis", flag.ExitOnError)
	addr := fs.String("redis", "", "the Go service's Redis, host:port")
	db := fs.Int("db", 1, "its Redis database")
	path := fs.String("acks", "", "check-ours' output")
	wait := fs.Duration("wait", 2*time.Minute, "how long the Go consumer may take")
	clear := fs.Bool("clear", false, "delete these users' keys first (and check nothing else)")
	fs.Parse(args)
	acks, err := readAcks(*path)
	if err != nil {
		return err
	}
	rdb := redis.NewClient(&redis.Options{Addr: *addr, DB: *db})
	defer rdb.Close()
	ctx := context.Background()
	if *clear {
		for _, a := range acks {
			if err := rdb.Del(ctx, fmt.Sprintf("user_%d", a.ID)).Err(); err != nil {
				return err
			}
		}
		return nil
	}
	deadline := time.Now().Add(*wait)
	for _, a := range acks {
		key := fmt.Sprintf("user_%d", a.ID)
		var val string
		for {
			val, err = rdb.Get(ctx, key).Result()
			if err == nil {
				break
			}
			if errors.Is(err, redis.Nil) && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
				continue
			}
			return fmt.Errorf("%s in the Go service's Redis (DB %d): %v", key, *db, err)
		}
		var u UserInfo
		if err := json.Unmarshal([]byte(val), &u); err != nil {
			return fmt.Errorf("%s = %s: %v", key, val, err)
		}
		if u.ID != a.ID || u.Name != a.Name || u.Email != a.Email || !u.CreateTime.Equal(a.CreateTime) || u.CreateTime.IsZero() {
			return fmt.Errorf("%s = %s; this service acknowledged %+v", key, val, a)
		}
	}
	log.Printf("the Go consumer stored all %d users this service created, each with its create_time (e.g. %s)", len(acks), acks[0].CreateTime.Format(time.RFC3339Nano))
	return nil
}

// scrape reads the unlabelled samples of a Prometheus text exposition.
func scrape(url string) (map[string]float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	values := map[string]float64{}
	for _, line := range strings.Split(string(body), "\n") {
		name, value, ok := strings.Cut(line, " ")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		if v, err := strconv.ParseFloat(value, 64); err == nil {
			values[name] = v
		}
	}
	return values, nil
}

// checkMetrics prints the projector's migration figures from /metrics and
// checks them: no dead letters, `superseded` events reported (waited for:
// the losing write of an id may be applied after its winner is readable).
func checkMetrics(args []string) error {
	fs := flag.NewFlagSet("metrics", flag.ExitOnError)
	url := fs.String("url", "", "this service's /metrics")
	superseded := fs.Int("superseded", 0, "events of the Go era that must be reported superseded")
	wait := fs.Duration("wait", time.Minute, "how long the projector may take to get there")
	fs.Parse(args)
	deadline := time.Now().Add(*wait)
	var values map[string]float64
	for {
		var err error
		if values, err = scrape(*url); err != nil {
			return err
		}
		if values["user_service_projector_legacy_superseded_total"] >= float64(*superseded) || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	var report []string
	for _, name := range []string{
		"user_service_projector_events_rehomed_total",
		"user_service_projector_legacy_superseded_total",
		"user_service_projector_dead_lettered_total",
		"user_service_projector_events_duplicate_total",
	} {
		report = append(report, fmt.Sprintf("%s %v", name, values[name]))
	}
	log.Printf("this service's projector: %s", strings.Join(report, ", "))
	if v := values["user_service_projector_dead_lettered_total"]; v != 0 {
		return fmt.Errorf("%v records dead-lettered", v)
	}
	if v := values["user_service_projector_legacy_superseded_total"]; v != float64(*superseded) {
		return fmt.Errorf("%v events reported superseded, want %d", v, *superseded)
	}
	if values["user_service_projector_events_rehomed_total"] == 0 {
		return errors.New("nothing re-homed: were the Go service's events spread over the partitions?")
	}
	return nil
}

// deadLetters counts the records of the dead-letter topic (0 if it does not
// exist).
func deadLetters(args []string) error {
	fs := flag.NewFlagSet("dead-letters", flag.ExitOnError)
	broker := fs.String("kafka", "", "a Kafka broker, host:port")
	topic := fs.String("topic", "", "the dead-letter topic")
	fs.Parse(args)
	conn, err := kafka.Dial("tcp", *broker)
	if err != nil {
		return err
	}
	defer conn.Close()
	parts, err := conn.ReadPartitions(*topic)
	if errors.Is(err, kafka.UnknownTopicOrPartition) {
		log.Printf("%s does not exist: 0 dead letters", *topic)
		return nil
	}
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var total int64
	for _, p := range parts {
		leader, err := kafka.DialLeader(ctx, "tcp", *broker, *topic, p.ID)
		if err != nil {
			return err
		}
		first, last, err := leader.ReadOffsets()
		leader.Close()
		if err != nil {
			return err
		}
		total += last - first
	}
	log.Printf("%s holds %d records", *topic, total)
	if total != 0 {
		return fmt.Errorf("%d events dead-lettered", total)
	}
	return nil
}
