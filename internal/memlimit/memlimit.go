// Package memlimit finds the memory limit the kernel holds the process
// to: its cgroup's (a container's limit, a systemd unit's MemoryMax). The
// Go runtime does not read it: without a soft limit (GOMEMLIMIT) the heap
// grows to twice what is live before a collection, and a process near
// its cgroup's limit is killed rather than made to collect sooner.
package memlimit

import (
	"bufio"
	"os"
	"path"
	"strconv"
	"strings"
)

// unlimited: cgroup v1 reports "no limit" as a page-rounded MaxInt64.
const unlimited = 1 << 62

// Cgroup returns the memory limit of the process's cgroup, the least of
// its own and its parents' (cgroup v2 memory.max, v1
// memory.limit_in_bytes), or false when there is none.
func Cgroup() (int64, bool) {
	return cgroupIn("/sys/fs/cgroup", "/proc/self/cgroup")
}

func cgroupIn(root, self string) (int64, bool) {
	f, err := os.Open(self)
	if err != nil {
		return 0, false
	}
	defer f.Close()
	var least int64
	found := false
	take := func(file string) {
		b, err := os.ReadFile(file)
		if err != nil {
			return
		}
		s := strings.TrimSpace(string(b))
		if s == "max" {
			return
		}
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil || n <= 0 || n >= unlimited {
			return
		}
		if !found || n < least {
			least, found = n, true
		}
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controllers:path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 || !strings.HasPrefix(parts[2], "/") {
			continue
		}
		p := path.Clean(parts[2])
		switch {
		case parts[0] == "0" && parts[1] == "":
			// v2: the limit of the cgroup and of every parent holds.
			for {
				take(path.Join(root, p, "memory.max"))
				if p == "/" {
					break
				}
				p = path.Dir(p)
			}
		case hasController(parts[1], "memory"):
			// v1: the process's cgroup, and the mount's root (what a
			// container sees of its own cgroup).
			take(path.Join(root, "memory", p, "memory.limit_in_bytes"))
			take(path.Join(root, "memory", "memory.limit_in_bytes"))
		}
	}
	return least, found
}

func hasController(list, name string) bool {
	for _, c := range strings.Split(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}
