// Package memtrim gives back the resident pages of the running executable
// that a long-running process does not use.
//
// A Go binary's code and read-only data are file-backed pages. Startup
// (package init, the first network map) touches code all over the binary,
// and each page fault also maps the neighbouring pages already in the page
// cache (fault-around, 64 KiB windows), so right after start nearly the
// whole binary counts in the process's RSS. Dropping those mappings once
// the process is up leaves the pages in the page cache; what the steady
// state runs faults back in (minor faults, no I/O) and only that stays
// resident. Writable mappings are never touched: dropping them would lose
// their contents.
package memtrim

import (
	"bufio"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Executable drops the read-only file-backed mappings of the running
// executable (its code and read-only data) from the resident set, and
// returns how many bytes of mappings it advised.
func Executable() (int64, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Stat(exe, &st); err != nil {
		return 0, err
	}
	f, err := os.Open("/proc/self/maps")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var total int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// start-end perms offset dev inode path
		fields := strings.Fields(sc.Text())
		if len(fields) < 6 || strings.Contains(fields[1], "w") || fields[1][0] != 'r' {
			continue
		}
		if ino, err := strconv.ParseUint(fields[4], 10, 64); err != nil || ino != st.Ino {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			continue
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			continue
		}
		for _, advice := range []uintptr{unix.MADV_RANDOM, unix.MADV_DONTNEED} {
			if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), advice); errno != 0 {
				return total, errno
			}
		}
		total += int64(end - start)
	}
	return total, sc.Err()
}
