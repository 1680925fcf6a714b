package agent

import (
	"slices"
	"strings"
	"testing"
)

func TestParseExposeFile(t *testing.T) {
	cases := []struct {
		name, in string
		want     []Export
		wantErr  string // a piece of the error, "" for none
	}{
		{name: "empty", in: "", want: nil},
		{name: "comments only", in: "# nothing yet\n", want: nil},
		{name: "empty list", in: "[]", want: []Export{}},
		{name: "two", in: "- name: db\n  target: 10.1.2.3:5432\n- name: Legacy-Web\n  target: 10.1.2.9:80\n  port: 8080\n",
			want: []Export{{Name: "db", Target: "10.1.2.3:5432", Port: 5432}, {Name: "legacy-web", Target: "10.1.2.9:80", Port: 8080}}},
		{name: "flow style", in: `[{name: a, target: "[::1]:22"}]`, want: []Export{{Name: "a", Target: "[::1]:22", Port: 22}}},
		{name: "unknown key", in: "- name: db\n  target: 10.1.2.3:5432\n  tagret: x\n", wantErr: "unknown field"},
		{name: "repeated key", in: "- name: db\n  name: db2\n  target: 10.1.2.3:5432\n", wantErr: "already set"},
		{name: "not a list", in: "name: db\ntarget: 10.1.2.3:5432\n", wantErr: "want a YAML list"},
		{name: "no target", in: "- name: db\n", wantErr: "entry 1"},
		{name: "bad port", in: "- name: db\n  target: 10.1.2.3:99999\n", wantErr: "1-65535"},
		{name: "port out of range", in: "- name: db\n  target: 10.1.2.3:1\n  port: 70000\n", wantErr: "want a YAML list"},
		{name: "bad name", in: "- name: \"d b\"\n  target: 10.1.2.3:1\n", wantErr: "entry 1"},
		{name: "duplicate name", in: "- {name: db, target: 10.0.0.1:1}\n- {name: DB, target: 10.0.0.2:2}\n", wantErr: "also entry 1"},
		{name: "duplicate port", in: "- {name: a, target: 10.0.0.1:80}\n- {name: b, target: 10.0.0.2:80}\n", wantErr: "mesh port 80"},
		{name: "too large", in: strings.Repeat("#", maxExposeFile+1), wantErr: "KiB"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseExposeFile([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %+v, %v; want an error with %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Fatalf("got %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

// FuzzParseExposeFile: any bytes give exports that each pass checkExport
// with distinct names and ports, or an error; never a panic.
func FuzzParseExposeFile(f *testing.F) {
	f.Add([]byte("- name: db\n  target: 10.1.2.3:5432\n"))
	f.Add([]byte("[{name: a, target: \"[::1]:22\", port: 2222}]"))
	f.Add([]byte("- name: db\n  name: x\n"))
	f.Add([]byte("&a [*a]"))
	f.Add([]byte("- !!binary aGVsbG8="))
	f.Fuzz(func(t *testing.T, b []byte) {
		es, err := ParseExposeFile(b)
		if err != nil {
			return
		}
		names, ports := map[string]bool{}, map[uint16]bool{}
		for _, e := range es {
			if c, err := checkExport(e); err != nil || c != e {
				t.Fatalf("export %+v does not pass checkExport: %v", e, err)
			}
			if names[e.Name] || ports[e.Port] {
				t.Fatalf("duplicate in %+v", es)
			}
			names[e.Name], ports[e.Port] = true, true
		}
	})
}
