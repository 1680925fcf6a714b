// Command vulndb lays out a folder of OSV entries, such as the data/osv
// folder of the golang.org/x/vulndb module, as the v1 Go vulnerability
// database that `govulncheck -db file:///DIR` reads
// (https://go.dev/security/vuln/database#api):
//
//	index/db.json       {"modified": the newest entry's time}
//	index/modules.json  each module with the entries that affect it
//	index/vulns.json    each entry's id, modified time and aliases
//	ID/<id>.json        the entries as they are
//
// CI cannot reach vuln.go.dev, so `make vuln` builds this from the vulndb
// module at a pinned version, which the module proxy serves.
//
// Usage:
//
//	go run ./scripts/vulndb -osv DIR -out DIR
//
// -out must not exist yet: a half-written database is never left where one
// was before.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

func main() {
	src := flag.String("osv", "", "folder of OSV entries, one `GO-....json` file each")
	out := flag.String("out", "", "folder to create the database in (must not exist)")
	flag.Parse()
	if *src == "" || *out == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	n, err := build(*src, *out)
	if err != nil {
		log.Fatalf("vulndb: %v", err)
	}
	fmt.Printf("vulndb: %d entries from %s in %s\n", n, *src, *out)
}

// entry is the part of an OSV entry that the indexes need.
type entry struct {
	ID       string    `json:"id"`
	Modified time.Time `json:"modified"`
	Aliases  []string  `json:"aliases,omitempty"`
	Affected []struct {
		Package struct {
			Name string `json:"name"` // the module path, or "stdlib" / "toolchain"
		} `json:"package"`
	} `json:"affected"`
}

type dbMeta struct {
	Modified time.Time `json:"modified"`
}

type moduleMeta struct {
	Path  string       `json:"path"`
	Vulns []moduleVuln `json:"vulns"`
}

// moduleVuln leaves out the optional "fixed" version: govulncheck uses it
// only to skip entries early, and decides from each entry's own ranges
// either way, so leaving it out costs a few file reads and no findings.
type moduleVuln struct {
	ID       string    `json:"id"`
	Modified time.Time `json:"modified"`
}

type vulnMeta struct {
	ID       string    `json:"id"`
	Modified time.Time `json:"modified"`
	Aliases  []string  `json:"aliases,omitempty"`
}

// build writes the database for the entries in src to the new folder out and
// returns how many entries it holds.
func build(src, out string) (int, error) {
	files, err := filepath.Glob(filepath.Join(src, "*.json"))
	if err != nil {
		return 0, err
	}
	if len(files) == 0 {
		return 0, fmt.Errorf("no OSV entries (*.json) in %s", src)
	}
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return 0, err
	}
	if err := os.Mkdir(out, 0o755); errors.Is(err, fs.ErrExist) {
		return 0, fmt.Errorf("%w (remove it first to rebuild)", err)
	} else if err != nil {
		return 0, err
	}
	for _, d := range []string{"ID", "index"} {
		if err := os.Mkdir(filepath.Join(out, d), 0o755); err != nil {
			return 0, err
		}
	}

	var db dbMeta
	modules := map[string]*moduleMeta{}
	var vulns []vulnMeta
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return 0, err
		}
		var e entry
		if err := json.Unmarshal(b, &e); err != nil {
			return 0, fmt.Errorf("%s: %w", f, err)
		}
		// govulncheck fetches an entry as ID/<id>.json: a file named
		// otherwise would be listed in the index and then not found.
		if e.ID == "" || filepath.Base(f) != e.ID+".json" {
			return 0, fmt.Errorf("%s: holds entry %q: want a file named <id>.json", f, e.ID)
		}
		if err := os.WriteFile(filepath.Join(out, "ID", e.ID+".json"), b, 0o644); err != nil {
			return 0, err
		}
		if e.Modified.After(db.Modified) {
			db.Modified = e.Modified
		}
		vulns = append(vulns, vulnMeta{ID: e.ID, Modified: e.Modified, Aliases: e.Aliases})
		for _, a := range e.Affected {
			path := a.Package.Name
			m := modules[path]
			if m == nil {
				m = &moduleMeta{Path: path}
				modules[path] = m
			}
			// An entry names a module once per range set (the stdlib's
			// release branches): list it once.
			if n := len(m.Vulns); n == 0 || m.Vulns[n-1].ID != e.ID {
				m.Vulns = append(m.Vulns, moduleVuln{ID: e.ID, Modified: e.Modified})
			}
		}
	}

	// Sorted, so that the same entries give the same bytes. Glob returns
	// files sorted by name, so each module's list is already in id order.
	mods := make([]*moduleMeta, 0, len(modules))
	for _, m := range modules {
		mods = append(mods, m)
	}
	slices.SortFunc(mods, func(a, b *moduleMeta) int { return strings.Compare(a.Path, b.Path) })
	for name, v := range map[string]any{"db.json": db, "modules.json": mods, "vulns.json": vulns} {
		b, err := json.Marshal(v)
		if err != nil {
			return 0, err
		}
		if err := os.WriteFile(filepath.Join(out, "index", name), b, 0o644); err != nil {
			return 0, err
		}
	}
	return len(vulns), nil
}
