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
// returns how many bytes of mappings it advised. A mapping holding any
// anonymous page is left alone: a read-only mapping can still hold private
// copies written before it was made read-only (the RELRO segment of a
// position-independent or externally linked build, relocated at load),
// which MADV_DONTNEED would replace with the file's unrelocated bytes.
func Executable() (int64, error) {
	exe, err := os.Executable()
	if err != nil {
		return 0, err
	}
	var st unix.Stat_t
	if err := unix.Stat(exe, &st); err != nil {
		return 0, err
	}
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return 0, err
	}
	defer f.Close()
	var (
		total      int64
		start, end uint64
		candidate  bool // the mapping being read is one of ours, read-only
		anonymous  bool // and holds anonymous pages
	)
	advise := func() error {
		if !candidate || anonymous {
			return nil
		}
		for _, advice := range []uintptr{unix.MADV_RANDOM, unix.MADV_DONTNEED} {
			if _, _, errno := unix.Syscall(unix.SYS_MADVISE, uintptr(start), uintptr(end-start), advice); errno != 0 {
				return errno
			}
		}
		total += int64(end - start)
		return nil
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		fields := strings.Fields(line)
		if len(fields) == 0 {
			continue
		}
		if strings.HasSuffix(fields[0], ":") {
			// An attribute line of the mapping above: "Anonymous: 4 kB".
			if fields[0] == "Anonymous:" && len(fields) > 1 && fields[1] != "0" {
				anonymous = true
			}
			continue
		}
		// A mapping's header: start-end perms offset dev inode path. The
		// inode alone is matched: on overlayfs (containers) the device
		// shown is the lower layer's, not the one stat gives. A read-only
		// mapping of another file with the same inode number would be
		// trimmed too, which is harmless: without anonymous pages its
		// pages come back from its file.
		if err := advise(); err != nil {
			return total, err
		}
		candidate, anonymous = false, false
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
		var err1, err2 error
		start, err1 = strconv.ParseUint(lo, 16, 64)
		end, err2 = strconv.ParseUint(hi, 16, 64)
		candidate = err1 == nil && err2 == nil && end > start
	}
	if err := sc.Err(); err != nil {
		return total, err
	}
	return total, advise()
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
// and is not made while it is busy. The faults counted are all minor
// faults, the heap's too: an idle process whose heap grows is trimmed
// again, at the price of a few faults. done, if not nil, is told the
// result of each trim. WhenIdle returns when ctx is done.
func WhenIdle(ctx context.Context, every time.Duration, done func(int64, error)) {
	whenIdle(ctx, every, minRefaults, done)
}

func whenIdle(ctx context.Context, every time.Duration, minFaults int64, done func(int64, error)) {
	_, lastTrim := usage()
	onIdle(ctx, every, every/idleShare, func() bool {
		if _, f := usage(); f-lastTrim < minFaults {
			return false
		}
		n, err := Executable()
		if done != nil {
			done(n, err)
		}
		_, lastTrim = usage()
		return true
	})
}

// onIdle calls trim at the end of each interval every during which the
// process used less than maxBusy of CPU, until ctx is done. trim reports
// whether it trimmed; the CPU a trim used does not count against the
// next interval.
func onIdle(ctx context.Context, every, maxBusy time.Duration, trim func() bool) {
	t := time.NewTicker(every)
	defer t.Stop()
	cpu, _ := usage()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		c, _ := usage()
		busy := c - cpu
		cpu = c
		if busy < maxBusy && trim() {
			cpu, _ = usage()
		}
	}
}

// HeapWhenIdle gives the heap's free pages back (Heap) at the end of an
// interval during which the process was idle, when it holds much more
// free heap than it uses. After a burst (thousands of agents joining, a
// reconnect storm, a bulk transfer) the Go runtime keeps the pages the
// burst's garbage took: its scavenger hands them back slowly and only down
// to about the next collection's goal, twice the live heap, so an idle
// process stays near the burst's peak. A trim costs one collection, made
// only while idle and at most once per Gap. done, if not nil, is told the
// bytes of each trim. HeapWhenIdle returns when ctx is done.
func HeapWhenIdle(ctx context.Context, cfg HeapConfig, done func(int64)) {
	var last time.Time
	onIdle(ctx, cfg.Every, time.Duration(cfg.IdleCPU*float64(cfg.Every)), func() bool {
		if time.Since(last) < cfg.Gap {
			return false
		}
		if free, objects := heapState(); free < cfg.MinFree || free < objects/4 {
			return false
		}
		n := Heap()
		last = time.Now()
		if done != nil {
			done(n)
		}
		return true
	})
}

// usage is the CPU time the process has used and its minor page faults.
func usage() (time.Duration, int64) {
	var ru unix.Rusage
	if unix.Getrusage(unix.RUSAGE_SELF, &ru) != nil {
		return 0, 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), int64(ru.Minflt)
}
