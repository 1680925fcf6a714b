package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// Two entries as the vulndb module has them: one that names the stdlib
// twice (two release branches) and one for a module.
var entries = map[string]string{
	"GO-2026-0001.json": `{"schema_version":"1.3.1","id":"GO-2026-0001","modified":"2026-03-01T00:00:00Z",
		"aliases":["CVE-2026-1"],
		"affected":[
			{"package":{"name":"stdlib","ecosystem":"Go"},"ranges":[{"type":"SEMVER","events":[{"introduced":"0"},{"fixed":"1.26.9"}]}]},
			{"package":{"name":"stdlib","ecosystem":"Go"},"ranges":[{"type":"SEMVER","events":[{"introduced":"1.27.0-0"},{"fixed":"1.27.2"}]}]},
			{"package":{"name":"golang.org/x/net","ecosystem":"Go"},"ranges":[{"type":"SEMVER","events":[{"introduced":"0"},{"fixed":"0.60.0"}]}]}]}`,
	"GO-2026-0002.json": `{"schema_version":"1.3.1","id":"GO-2026-0002","modified":"2026-01-01T00:00:00Z",
		"affected":[{"package":{"name":"golang.org/x/net","ecosystem":"Go"},"ranges":[{"type":"SEMVER","events":[{"introduced":"0"},{"fixed":"0.62.0"}]}]}]}`,
}

func writeEntries(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func readJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}

func TestBuild(t *testing.T) {
	src := writeEntries(t, entries)
	// In a fresh clone bin/ does not exist yet.
	out := filepath.Join(t.TempDir(), "bin", "db")
	n, err := build(src, out)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("build counted %d entries, want 2", n)
	}

	var db dbMeta
	readJSON(t, filepath.Join(out, "index", "db.json"), &db)
	if want := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC); !db.Modified.Equal(want) {
		t.Errorf("db.json modified %v, want the newest entry's %v", db.Modified, want)
	}

	var mods []moduleMeta
	readJSON(t, filepath.Join(out, "index", "modules.json"), &mods)
	got := map[string][]string{}
	var order []string
	for _, m := range mods {
		order = append(order, m.Path)
		for _, v := range m.Vulns {
			got[m.Path] = append(got[m.Path], v.ID)
		}
	}
	want := map[string][]string{
		"golang.org/x/net": {"GO-2026-0001", "GO-2026-0002"},
		"stdlib":           {"GO-2026-0001"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("modules.json lists %v, want %v", got, want)
	}
	if !reflect.DeepEqual(order, []string{"golang.org/x/net", "stdlib"}) {
		t.Errorf("modules.json order %v, want sorted by path", order)
	}

	var vulns []vulnMeta
	readJSON(t, filepath.Join(out, "index", "vulns.json"), &vulns)
	if len(vulns) != 2 || vulns[0].ID != "GO-2026-0001" || !reflect.DeepEqual(vulns[0].Aliases, []string{"CVE-2026-1"}) {
		t.Errorf("vulns.json %+v", vulns)
	}

	for name, body := range entries {
		b, err := os.ReadFile(filepath.Join(out, "ID", name))
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != body {
			t.Errorf("ID/%s differs from its source", name)
		}
	}
}

func TestBuildRefuses(t *testing.T) {
	for _, tc := range []struct {
		name      string
		files     map[string]string
		outExists bool
		wantErr   string
	}{
		{"no entries", map[string]string{"README.md": "#"}, false, "no OSV entries"},
		{"file not named by its id", map[string]string{"GO-2026-0003.json": `{"id":"GO-2026-0004"}`}, false, "want a file named <id>.json"},
		{"not JSON", map[string]string{"GO-2026-0005.json": `{`}, false, "GO-2026-0005.json"},
		{"out exists", entries, true, "remove it first"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := writeEntries(t, tc.files)
			out := filepath.Join(t.TempDir(), "db")
			if tc.outExists {
				if err := os.Mkdir(out, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			_, err := build(src, out)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("build: %v, want an error containing %q", err, tc.wantErr)
			}
		})
	}
}
