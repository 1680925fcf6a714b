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
	"context"
	"os"
	"strconv"
	"strings"
	"time"

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

// idleShare says how quiet a process must have been over one interval of
// WhenIdle to be trimmed again: under 1/idleShare of a CPU.
const idleShare = 100

// minRefaults is how many page faults since the last trim make another
// worth it: fewer, and what came back is the idle path itself.
const minRefaults = 32

// WhenIdle trims the executable again (Executable) at the end of each
// interval every during which the process used under 1% of a CPU, once at
// least a few pages have faulted back in since the last trim: a burst of
// traffic faults in the code of the data path (the netstack, the
// tunnel's crypto), which an idle process need not keep resident. A trim
// of pages the process goes on using costs only minor faults (no I/O),
// and is not made while it is busy. done, if not nil, is told the result
// of each trim. WhenIdle returns when ctx is done.
func WhenIdle(ctx context.Context, every time.Duration, done func(int64, error)) {
	t := time.NewTicker(every)
	defer t.Stop()
	cpu, faults := usage()
	lastTrim := faults
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c, f := usage()
		busy := c - cpu
		cpu = c
		if busy >= every/idleShare || f-lastTrim < minRefaults {
			continue
		}
		n, err := Executable()
		if done != nil {
			done(n, err)
		}
		_, lastTrim = usage()
	}
}

// usage is the CPU time the process has used and its minor page faults.
func usage() (time.Duration, int64) {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), int64(ru.Minflt)
}
