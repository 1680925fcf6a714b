package layout

import (
	"bytes"
	"encoding/json"
	"go/parser"
	"go/token"
	"io"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

const module = "github.com/meshlink/meshlink"

type pkg struct {
	ImportPath string
	Dir        string
	Doc        string
	Name       string
	Deps       []string
	Imports    []string
	GoFiles    []string
	TestGoFiles,
	XTestGoFiles []string
}

// list runs `go list -json` over the whole module.
func list(t *testing.T, args ...string) []pkg {
	t.Helper()
	cmd := exec.Command("go", append([]string{"list", "-json"}, append(args, module+"/...")...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.Bytes())
	}
	var pkgs []pkg
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var p pkg
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 10 {
		t.Fatalf("go list found only %d packages", len(pkgs))
	}
	return pkgs
}

func rel(path string) string { return strings.TrimPrefix(strings.TrimPrefix(path, module), "/") }

func under(path, dir string) bool {
	r := rel(path)
	return r == dir || strings.HasPrefix(r, dir+"/")
}

// ownDeps is the module's packages among p's dependencies (direct and
// indirect, without tests).
func ownDeps(p pkg) []string {
	var own []string
	for _, d := range p.Deps {
		if strings.HasPrefix(d, module+"/") {
			own = append(own, rel(d))
		}
	}
	sort.Strings(own)
	return own
}

// leaves are the packages that import only each other and that the
// protocol packages may build on.
var leaves = map[string]bool{"internal/key": true, "internal/atomicfile": true}

// TestImportRules: the agent and the coordinator meet only over the
// network, and the protocol packages stand on their own.
func TestImportRules(t *testing.T) {
	pkgs := list(t, "-deps=false")
	byPath := map[string]pkg{}
	for _, p := range pkgs {
		byPath[rel(p.ImportPath)] = p
	}
	for _, p := range pkgs {
		path := rel(p.ImportPath)
		for _, d := range ownDeps(p) {
			switch {
			case under(path, "agent") && under(d, "coordinator"):
				t.Errorf("%s imports %s: the agent must not depend on the coordinator", path, d)
			case under(path, "coordinator") && under(d, "agent"):
				t.Errorf("%s imports %s: the coordinator must not depend on the agent", path, d)
			}
			for _, proto := range []string{"wire", "netstack", "dns"} {
				if path == proto && !leaves[d] {
					t.Errorf("%s imports %s: %s may import only leaf packages of the module (%v)", path, d, proto, leaves)
				}
			}
		}
	}
	for l := range leaves {
		p, ok := byPath[l]
		if !ok {
			continue
		}
		for _, d := range ownDeps(p) {
			if !leaves[d] {
				t.Errorf("leaf package %s imports %s, which is not a leaf", l, d)
			}
		}
	}
}

// TestPackageDocs: every package says what its one job is.
func TestPackageDocs(t *testing.T) {
	for _, p := range list(t, "-deps=false", "-test=false") {
		if p.Doc == "" && len(p.GoFiles) == 0 {
			p.Doc = testFilesDoc(t, p)
		}
		if p.Doc == "" {
			t.Errorf("package %s has no doc comment (// Package %s ... in one of its files)", rel(p.ImportPath), p.Name)
		}
	}
}

// testFilesDoc is the package comment of a package made only of tests,
// which go list does not report.
func testFilesDoc(t *testing.T, p pkg) string {
	for _, f := range p.TestGoFiles {
		af, err := parser.ParseFile(token.NewFileSet(), filepath.Join(p.Dir, f), nil, parser.PackageClauseOnly|parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		if af.Doc != nil {
			return af.Doc.Text()
		}
	}
	return ""
}
