package config

import (
	"bytes"
	"errors"
	"os"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary documents to the parser: it must never panic,
// a document it accepts must be complete (the runtime relies on that), and
// every problem it reports must name this file and a line that exists.
func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	f.Add([]byte(replaceLine(13, "m = 1")))
	f.Add([]byte(replaceLine(17, "agent = [{ path = \"/usr/sbin/fence_ipmilan\", node_options = { \"2\" = { ip = \"x\" } } }]")))
	f.Add([]byte("[[array]]\n[[array]]\nname = 'x'\n[array.export]\nsocket = '/a'\n"))
	f.Add([]byte("a.b.c = 1\n[a]\n"))
	if ex, err := os.ReadFile("../../../packaging/mdclusterd.toml.example"); err == nil {
		f.Add(ex)
	}
	fsys := testFS()
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(file, data, fsys)
		if err != nil {
			var es Errors
			if !errors.As(err, &es) || len(es) == 0 {
				t.Fatalf("not a list of problems: %v", err)
			}
			lines := bytes.Count(data, []byte("\n")) + 1
			for _, e := range es {
				if e.File != file || e.Line < 0 || e.Line > lines || e.Msg == "" {
					t.Fatalf("bad problem report %+v (%d lines)", e, lines)
				}
				if strings.Contains(e.Field, "\n") {
					t.Fatalf("field with a line break: %q", e.Field)
				}
			}
			return
		}
		if cfg.NodeID == 0 || cfg.Quorum.Validate() != nil || len(cfg.ClusterKey) < MinKeyBytes ||
			cfg.DataDir == "" || cfg.Gossip.BindAddr == "" || cfg.DLM.ListenAddr == "" || len(cfg.Fencing.Levels) == 0 ||
			cfg.Control.Socket == "" || cfg.Control.MaxRequestBytes <= 0 || cfg.Shutdown.LeaveTimeout <= 0 {
			t.Fatalf("accepted an incomplete configuration: %+v", cfg)
		}
		for _, lv := range cfg.Fencing.Levels {
			if lv.Stamp == (len(lv.Agents) > 0) {
				t.Fatalf("level is neither stamp nor agents: %+v", lv)
			}
			for _, a := range lv.Agents {
				if a.Path == "" {
					t.Fatalf("agent without a path: %+v", a)
				}
			}
		}
		for _, a := range cfg.Arrays {
			if (a.Name == "") == (a.UUID == "") || a.ExportSocket == "" {
				t.Fatalf("array %+v", a)
			}
		}
	})
}
