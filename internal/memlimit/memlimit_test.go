package memlimit

import (
	"os"
	"path/filepath"
	"testing"
)

func TestCgroup(t *testing.T) {
	write := func(t *testing.T, root, rel, s string) {
		t.Helper()
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name  string
		self  string
		files map[string]string
		want  int64
		ok    bool
	}{
		{"v2 own", "0::/pod/ctr\n", map[string]string{"pod/ctr/memory.max": "1073741824\n", "pod/memory.max": "max\n"}, 1 << 30, true},
		{"v2 parent lower", "0::/pod/ctr\n", map[string]string{"pod/ctr/memory.max": "max\n", "pod/memory.max": "536870912\n"}, 1 << 29, true},
		{"v2 none", "0::/\n", map[string]string{"memory.max": "max\n"}, 0, false},
		{"v1", "4:memory:/docker/abc\n1:cpu:/\n", map[string]string{"memory/docker/abc/memory.limit_in_bytes": "2147483648\n"}, 2 << 30, true},
		{"v1 unlimited", "4:cpuacct,memory:/x\n", map[string]string{"memory/x/memory.limit_in_bytes": "9223372036854771712\n", "memory/memory.limit_in_bytes": "9223372036854771712\n"}, 0, false},
		{"v1 container root", "4:memory:/docker/abc\n", map[string]string{"memory/memory.limit_in_bytes": "268435456\n"}, 1 << 28, true},
		{"garbage", "nonsense\n0::relative\n", map[string]string{"memory.max": "12abc"}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			for rel, s := range tc.files {
				write(t, root, rel, s)
			}
			self := filepath.Join(t.TempDir(), "cgroup")
			write(t, filepath.Dir(self), "cgroup", tc.self)
			got, ok := cgroupIn(root, self)
			if got != tc.want || ok != tc.ok {
				t.Errorf("got %d, %v; want %d, %v", got, ok, tc.want, tc.ok)
			}
		})
	}
	if _, ok := cgroupIn(t.TempDir(), "/nonexistent/cgroup"); ok {
		t.Error("a limit without a cgroup file")
	}
}
