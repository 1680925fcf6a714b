package layout

import (
	"bytes"
	"encoding/json"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"unicode"
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

// docLink is a reference to a heading of a Markdown file under docs/, as
// code comments and docs write it: docs/NAME.md#anchor, or (#anchor) inside
// a Markdown file for its own headings.
var (
	docLink  = regexp.MustCompile(`docs/([a-z0-9-]+\.md)#([a-z0-9_-]+)`)
	selfLink = regexp.MustCompile(`\]\(#([a-z0-9_-]+)\)`)
)

// TestDocLinks: every docs/FILE.md#anchor named in the module's Go and
// Markdown files names a heading that exists, so that a rule in the code
// keeps pointing at the measurements behind it.
func TestDocLinks(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	anchors := map[string]map[string]bool{} // doc file -> its headings' anchors
	headings := func(doc string) map[string]bool {
		if a, ok := anchors[doc]; ok {
			return a
		}
		a := map[string]bool{}
		b, err := os.ReadFile(filepath.Join(root, "docs", doc))
		if err != nil {
			anchors[doc] = nil
			return nil
		}
		fence := false
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "```") {
				fence = !fence
			}
			if h, ok := strings.CutPrefix(strings.TrimLeft(line, "#"), " "); ok && !fence && strings.HasPrefix(line, "#") {
				a[slug(h)] = true
			}
		}
		anchors[doc] = a
		return a
	}
	checked := 0
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if strings.HasPrefix(d.Name(), ".") && path != root {
				return filepath.SkipDir
			}
			return nil
		}
		ext := filepath.Ext(path)
		if ext != ".go" && ext != ".md" {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		name, _ := filepath.Rel(root, path)
		for _, m := range docLink.FindAllStringSubmatch(string(b), -1) {
			checked++
			if a := headings(m[1]); a == nil {
				t.Errorf("%s: %s: no such file", name, m[0])
			} else if !a[m[2]] {
				t.Errorf("%s: %s: no heading with that anchor in docs/%s", name, m[0], m[1])
			}
		}
		if rel, ok := strings.CutPrefix(filepath.ToSlash(name), "docs/"); ok && ext == ".md" && !strings.Contains(rel, "/") {
			for _, m := range selfLink.FindAllStringSubmatch(string(b), -1) {
				checked++
				if !headings(rel)[m[1]] {
					t.Errorf("%s: (#%s): no heading with that anchor", name, m[1])
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked == 0 {
		t.Fatal("found no links to docs/ headings: is the pattern still right?")
	}
}

// slug is the anchor GitHub gives a Markdown heading: lower case, spaces to
// hyphens, and every other character but letters, digits, '-' and '_'
// dropped.
func slug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(strings.TrimSpace(heading)) {
		switch {
		case r == ' ':
			b.WriteByte('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// TestEnvironmentOnlyInCmd: configuration comes from the environment only in
// cmd/, which turns flags and MESHLINK_* variables into config structs; the
// libraries take config fields. Tests, and the test/ harness packages, may
// read variables that say what a test run must not skip.
func TestEnvironmentOnlyInCmd(t *testing.T) {
	readers := map[string]bool{"Getenv": true, "LookupEnv": true, "Environ": true, "ExpandEnv": true}
	for _, p := range list(t, "-deps=false", "-test=false") {
		if under(p.ImportPath, "cmd") || under(p.ImportPath, "test") {
			continue
		}
		for _, f := range p.GoFiles {
			path := filepath.Join(p.Dir, f)
			fset := token.NewFileSet()
			af, err := parser.ParseFile(fset, path, nil, 0)
			if err != nil {
				t.Fatal(err)
			}
			osName := ""
			for _, imp := range af.Imports {
				if imp.Path.Value == `"os"` {
					osName = "os"
					if imp.Name != nil {
						osName = imp.Name.Name
					}
				}
			}
			if osName == "" {
				continue
			}
			ast.Inspect(af, func(n ast.Node) bool {
				sel, ok := n.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				if x, ok := sel.X.(*ast.Ident); ok && x.Name == osName && readers[sel.Sel.Name] {
					t.Errorf("%s: os.%s outside cmd/: take a config field that cmd/meshlink sets from a flag and its MESHLINK_* variable", fset.Position(sel.Pos()), sel.Sel.Name)
				}
				return true
			})
		}
	}
}
