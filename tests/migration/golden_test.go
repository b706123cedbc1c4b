// The wire format both ways, checked with Go's own encoding/json against the
// golden files in tests/golden (the Rust side: src/domain/event.rs):
//
//   - the article's events there are byte for byte what its Go code writes
//     (json.Marshal of its UserInfo);
//   - this service's events there decode into that same struct, every field
//     whole, as the Go service's consumer decodes them.
package migration

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// UserInfo is the article's user record (tests/migration/go-peer/main.go):
// the Kafka message value and the Redis value.
type UserInfo struct {
	ID         int64     `json:"id"`
	Name       string    `json:"name"`
	Email      string    `json:"email"`
	CreateTime time.Time `json:"create_time"`
}

func golden(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "golden", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTheArticlesGoldenFilesAreWhatItsGoCodeWrites(t *testing.T) {
	shanghai := time.FixedZone("CST", 8*3600)
	for name, u := range map[string]UserInfo{
		"article-utc-nanos.json":    {1764078000123456, "Ada Lovelace", "ada@example.com", time.Date(2025, 11, 25, 13, 40, 0, 123456789, time.UTC)},
		"article-whole-second.json": {1764078000123457, "Grace Hopper", "grace@example.com", time.Date(2025, 11, 25, 13, 40, 1, 0, time.UTC)},
		"article-offset.json":       {1764078000123458, "李雷", "li.lei@example.cn", time.Date(2025, 11, 25, 21, 40, 2, 500000000, shanghai)},
		"article-html-escaped.json": {1764078000123459, "Ada & <Bob>", "ada.bob@example.com", time.Date(2025, 11, 25, 13, 40, 3, 10000000, time.UTC)},
	} {
		got, err := json.Marshal(&u)
		if err != nil {
			t.Fatal(err)
		}
		if want := golden(t, name); string(got) != string(want) {
			t.Errorf("%s:\n Go writes %s\n golden is %s", name, got, want)
		}
	}
}

func TestOurGoldenFilesDecodeIntoTheArticlesStruct(t *testing.T) {
	for name, want := range map[string]UserInfo{
		"ours-plain.json":      {42, "Ada Lovelace", "ada@example.com", time.Date(2025, 11, 25, 13, 40, 0, 123000000, time.UTC)},
		"ours-request-id.json": {5000000000001, "Zoë 李", "zoe@xn--bcher-kva.example", time.Date(2025, 11, 25, 13, 40, 1, 0, time.UTC)},
		"ours-html.json":       {43, "Ada & <Bob>", "ada.bob@example.com", time.Date(2025, 11, 25, 13, 40, 2, 500000000, time.UTC)},
	} {
		var got UserInfo
		if err := json.Unmarshal(golden(t, name), &got); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got.ID != want.ID || got.Name != want.Name || got.Email != want.Email ||
			!got.CreateTime.Equal(want.CreateTime) || got.CreateTime.Location() != time.UTC {
			t.Errorf("%s: decoded %+v, want %+v", name, got, want)
		}
	}
}
