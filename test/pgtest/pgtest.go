// Package pgtest runs a throwaway PostgreSQL server for tests: one cluster
// per test binary, made with initdb in a temporary directory and run as an
// unprivileged user (nobody, through setpriv, when the tests run as root),
// listening only on a Unix socket there; each test gets a database of its
// own. A package's TestMain calls Main so that the server stops when the
// tests end; the server also dies with the test binary (parent-death
// signal), so a crashed run leaves nothing behind.
//
// Without PostgreSQL (Debian's postgresql package) a test asking for a
// database skips with a message; with MESHLINK_REQUIRE_NETNS=1 (CI) it
// fails instead.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/meshlink/meshlink/internal/tstest"
)

// user is the cluster's superuser.
const user = "meshlink"

var (
	mu      sync.Mutex // guards the fields below
	cluster *server
	failed  error // why the cluster could not start, for every later test
	started bool

	dbSeq atomic.Int64
)

type server struct {
	dir  string // owned by the server's user; holds data/ and the socket
	cmd  *exec.Cmd
	logf *os.File
}

// exited reaps the server if it has exited, without blocking. (No
// goroutine waits for it: the server outlives single tests, and the
// tests' goroutine-leak checks would count one.)
func (s *server) exited() bool {
	var ws syscall.WaitStatus
	pid, err := syscall.Wait4(s.cmd.Process.Pid, &ws, syscall.WNOHANG, nil)
	return pid == s.cmd.Process.Pid || err != nil
}

// Main runs the tests and stops the server if one was started.
func Main(m *testing.M) {
	code := m.Run()
	Stop()
	os.Exit(code)
}

// Stop stops the server, if it runs, and removes its directory.
func Stop() {
	mu.Lock()
	defer mu.Unlock()
	if cluster == nil {
		return
	}
	cluster.stop()
	cluster = nil
}

// Bin returns the path of a PostgreSQL server program (initdb, postgres,
// pg_ctl): on PATH, else in Debian's /usr/lib/postgresql/VERSION/bin,
// newest version first.
func Bin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	matches, _ := filepath.Glob(filepath.Join("/usr/lib/postgresql", "*", "bin", name))
	sort.Slice(matches, func(i, j int) bool { return version(matches[i]) > version(matches[j]) })
	for _, m := range matches {
		if fi, err := os.Stat(m); err == nil && fi.Mode()&0o111 != 0 {
			return m, nil
		}
	}
	return "", fmt.Errorf("pgtest: %s not found on PATH nor in /usr/lib/postgresql/*/bin: install PostgreSQL (apt-get install postgresql)", name)
}

func version(p string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(p))))
	return v
}

// skip skips t, or fails it when the run must not skip.
func skip(t testing.TB, why error) {
	t.Helper()
	if os.Getenv("MESHLINK_REQUIRE_NETNS") == "1" {
		t.Fatalf("pgtest: PostgreSQL is required (MESHLINK_REQUIRE_NETNS=1): %v", why)
	}
	t.Skipf("pgtest: skipped, no PostgreSQL: %v", why)
}

// DB creates a fresh, empty database and returns its postgres:// URL. The
// first call starts the server.
func DB(t testing.TB) string {
	t.Helper()
	mu.Lock()
	if !started {
		started = true
		cluster, failed = start()
	}
	c, err := cluster, failed
	mu.Unlock()
	if err != nil {
		skip(t, err)
	}
	name := fmt.Sprintf("t%d_%d", os.Getpid(), dbSeq.Add(1))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.url("postgres"))
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	return c.url(name)
}

func (c *server) url(db string) string {
	q := url.Values{"host": {c.dir}, "sslmode": {"disable"}}
	return "postgres://" + user + "@/" + db + "?" + q.Encode()
}

// asUser runs a command as the unprivileged user when we are root
// (PostgreSQL refuses to run as root).
func asUser(name string, args ...string) *exec.Cmd {
	if os.Geteuid() != 0 {
		return exec.Command(name, args...)
	}
	return exec.Command("setpriv", append([]string{"--reuid=nobody", "--regid=nogroup", "--clear-groups", "--pdeathsig=TERM", "--", name}, args...)...)
}

func start() (*server, error) {
	initdb, err := Bin("initdb")
	if err != nil {
		return nil, err
	}
	postgres, err := Bin("postgres")
	if err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("setpriv"); err != nil {
			return nil, fmt.Errorf("pgtest: running as root needs setpriv (util-linux) to run PostgreSQL as nobody")
		}
	}
	// Short: a Unix socket path must fit in 107 bytes.
	dir, err := os.MkdirTemp("", "pg")
	if err != nil {
		return nil, err
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(dir, 65534, 65534); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	cmd := asUser(initdb, "-D", data, "-U", user, "--auth=trust", "--no-sync", "-E", "UTF8", "--no-locale")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: initdb: %v: %s", err, out)
	}
	cmd = asUser(postgres, "-D", data, "-k", dir, "-c", "listen_addresses=", "-c", "fsync=off",
		"-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
		"-c", "shared_buffers=16MB")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	logf, err := os.Create(filepath.Join(dir, "server.log"))
	if err == nil {
		cmd.Stdout, cmd.Stderr = logf, logf
	}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: start postgres: %v", err)
	}
	s := &server{dir: dir, cmd: cmd, logf: logf}
	// Ready when a connection succeeds, or failed when it exits first.
	var gone bool
	err = tstest.Poll(60*time.Second, func() error {
		if gone = s.exited(); gone {
			return nil
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, s.url("postgres"))
		if err != nil {
			return err
		}
		conn.Close(ctx)
		return nil
	})
	if gone {
		log, _ := os.ReadFile(filepath.Join(dir, "server.log"))
		logf.Close()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("pgtest: postgres exited: %s", log)
	}
	if err != nil {
		s.stop()
		return nil, fmt.Errorf("pgtest: postgres did not accept connections within 60s: %v", err)
	}
	return s, nil
}

// stop asks for a fast shutdown (SIGINT), then kills after a bound.
func (s *server) stop() {
	s.cmd.Process.Signal(syscall.SIGINT)
	if tstest.Poll(20*time.Second, func() error {
		if s.exited() {
			return nil
		}
		return errors.New("running")
	}) != nil {
		s.cmd.Process.Kill()
		var ws syscall.WaitStatus
		syscall.Wait4(s.cmd.Process.Pid, &ws, 0, nil)
	}
	if s.logf != nil {
		s.logf.Close()
	}
	os.RemoveAll(s.dir)
}
