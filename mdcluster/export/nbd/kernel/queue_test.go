package kernel

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// fakeQueue makes sysBlock a temporary tree with nbdN/queue holding the
// driver's defaults, as the 6.1 nbd driver sets them.
func fakeQueue(t *testing.T, idx, hwKiB string) string {
	t.Helper()
	old := sysBlock
	sysBlock = t.TempDir()
	t.Cleanup(func() { sysBlock = old })
	q := filepath.Join(sysBlock, "nbd"+idx, "queue")
	if err := os.MkdirAll(q, 0o755); err != nil {
		t.Fatal(err)
	}
	for f, v := range map[string]string{"max_sectors_kb": "128\n", "max_hw_sectors_kb": hwKiB + "\n", "scheduler": "[mq-deadline] none\n"} {
		if err := os.WriteFile(filepath.Join(q, f), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return q
}

func readQ(t *testing.T, q, f string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(q, f))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestTuneQueue(t *testing.T) {
	for _, c := range []struct {
		name, hw string
		o        Options
		max      string
		sched    string
	}{
		{"default", "32768", Options{}, "4096", "none"},
		{"capped by the driver", "1024", Options{}, "1024", "none"},
		{"asked for", "32768", Options{MaxRequestKiB: 512}, "512", "none"},
		{"kept", "32768", Options{KeepQueue: true}, "128", "[mq-deadline] none"},
	} {
		t.Run(c.name, func(t *testing.T) {
			q := fakeQueue(t, "3", c.hw)
			if err := tuneQueue(3, c.o); err != nil {
				t.Fatal(err)
			}
			if got := readQ(t, q, "max_sectors_kb"); got != c.max {
				t.Errorf("max_sectors_kb %s, want %s", got, c.max)
			}
			if got := readQ(t, q, "scheduler"); got != c.sched {
				t.Errorf("scheduler %q, want %q", got, c.sched)
			}
		})
	}
}

// TestTuneQueueMissing: a device without a queue directory (no sysfs, or
// the wrong index) is an error naming both settings, not a silent success.
func TestTuneQueueMissing(t *testing.T) {
	fakeQueue(t, "3", "32768")
	err := tuneQueue(4, Options{})
	if err == nil {
		t.Fatal("no error for a device without a queue directory")
	}
	for _, want := range []string{"nbd4: max request 4096 KiB", "nbd4: scheduler none"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestValidateMaxRequest(t *testing.T) {
	o := Options{Index: 0, Size: 4096, MaxRequestKiB: -1}
	if err := o.validate(); err == nil || !strings.Contains(err.Error(), "max request") {
		t.Errorf("negative MaxRequestKiB: %v", err)
	}
}
