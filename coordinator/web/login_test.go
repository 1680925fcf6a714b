package web

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/meshlink/meshlink/coordinator/store"
)

// loginConsole is a Console on a fresh store, on a clock that moves only
// when the test says, counting the password comparisons it runs (and
// remembering the hashes compared against).
type loginConsole struct {
	*Console
	now       atomic.Int64 // unix nanoseconds
	compares  atomic.Int64
	mu        sync.Mutex
	hashesSaw [][]byte
}

func newLoginConsole(t *testing.T) *loginConsole {
	t.Helper()
	st, err := store.OpenSQLite(context.Background(), filepath.Join(t.TempDir(), "meshlink.db"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	lc := &loginConsole{}
	lc.now.Store(time.Unix(1_000_000, 0).UnixNano())
	lc.Console = New(Config{Store: st, Now: func() time.Time { return time.Unix(0, lc.now.Load()) }})
	lc.Console.compare = func(hash, pw []byte) error {
		lc.compares.Add(1)
		lc.mu.Lock()
		lc.hashesSaw = append(lc.hashesSaw, hash)
		lc.mu.Unlock()
		return bcrypt.CompareHashAndPassword(hash, pw)
	}
	return lc
}

func (lc *loginConsole) advance(d time.Duration) { lc.now.Add(int64(d)) }

func (lc *loginConsole) addUser(t *testing.T, name, pw string) {
	t.Helper()
	h, _ := bcrypt.GenerateFromPassword([]byte(pw), bcrypt.MinCost)
	if _, err := lc.store.CreateUser(context.Background(), store.User{Username: name, PasswordHash: string(h)}); err != nil {
		t.Fatal(err)
	}
}

// login posts the password form from remote (an "ip:port") and returns
// the status and the page.
func (lc *loginConsole) login(remote, user, pw string) (int, string) {
	form := url.Values{"username": {user}, "password": {pw}}
	r := httptest.NewRequest(http.MethodPost, "https://mesh.example/login", strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	r.RemoteAddr = remote
	w := httptest.NewRecorder()
	lc.ServeHTTP(w, r)
	return w.Code, w.Body.String()
}

// TestLoginParallelGuesses performs the race of issue 9: 40 wrong guesses
// at once from one source. The attempt is reserved before the hash is
// compared, so only the free attempts are evaluated; the rest are refused
// without hashing.
func TestLoginParallelGuesses(t *testing.T) {
	lc := newLoginConsole(t)
	lc.addUser(t, "admin", "right-password-1")
	const n = 40
	var wg sync.WaitGroup
	codes := make([]int, n)
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			codes[i], _ = lc.login("192.0.2.7:4000", "admin", "guess")
		}()
	}
	close(start)
	wg.Wait()
	var wrong, refused int
	for _, c := range codes {
		switch c {
		case http.StatusUnauthorized:
			wrong++
		case http.StatusTooManyRequests:
			refused++
		default:
			t.Errorf("status %d", c)
		}
	}
	if wrong != loginFreePair || refused != n-loginFreePair || lc.compares.Load() != loginFreePair {
		t.Fatalf("%d parallel guesses: %d evaluated (%d comparisons), %d refused; want %d evaluated", n, wrong, lc.compares.Load(), refused, loginFreePair)
	}
}

// TestLoginLockoutOtherSource performs the lockout of issue 9: a flood of
// wrong guesses for admin from one source, then admin signs in from
// another with the right password. The flooding source is held back
// longer and longer.
func TestLoginLockoutOtherSource(t *testing.T) {
	lc := newLoginConsole(t)
	lc.addUser(t, "admin", "right-password-1")
	const attacker = "198.51.100.9:5000"
	evaluated := 0
	for i := 0; i < 100; i++ {
		code, body := lc.login(attacker, "admin", "guess")
		switch code {
		case http.StatusUnauthorized:
			evaluated++
		case http.StatusTooManyRequests:
			if !strings.Contains(body, "Too many failed sign-ins from here. Wait ") {
				t.Fatalf("refusal page: %s", body)
			}
		default:
			t.Fatalf("attempt %d: %d", i, code)
		}
		lc.advance(time.Second)
	}
	if evaluated > loginFreePair+2 {
		t.Fatalf("%d guesses in 100s from one source were evaluated", evaluated)
	}
	// Even the right password from the flooding source waits.
	if code, _ := lc.login(attacker, "admin", "right-password-1"); code != http.StatusTooManyRequests {
		t.Fatalf("right password from the flooding source: %d, want 429", code)
	}
	// The admin elsewhere signs in (and so does another IPv6 subscriber).
	for _, from := range []string{"203.0.113.5:6000", "[2001:db8:1::5]:6000"} {
		if code, body := lc.login(from, "admin", "right-password-1"); code != http.StatusSeeOther {
			t.Fatalf("admin from %s during the flood: %d %s", from, code, body)
		}
	}
	// The delay grows with each refused-then-allowed attempt: after an hour
	// of one guess a second, the attacker has had few evaluations.
	for i := 0; i < 3600; i++ {
		if code, _ := lc.login(attacker, "admin", "guess"); code == http.StatusUnauthorized {
			evaluated++
		}
		lc.advance(time.Second)
	}
	// Delays of 1, 2, 4, 8, 16 and 32 minutes: five more in the hour.
	if evaluated > loginFreePair+5 {
		t.Fatalf("%d guesses evaluated in an hour from one source", evaluated)
	}
	t.Logf("one guess a second for 3700s from one source: %d evaluated", evaluated)
}

// TestLoginSourceSpray: one source guessing many usernames is held back by
// the per-source key; addresses within one IPv6 /64 are one source.
func TestLoginSourceSpray(t *testing.T) {
	lc := newLoginConsole(t)
	evaluated := 0
	for i := 0; i < 60; i++ {
		from := "[2001:db8:2::" + string(rune('a'+i%6)) + "]:7000"
		if code, _ := lc.login(from, "user"+string(rune('a'+i%26)), "guess"); code == http.StatusUnauthorized {
			evaluated++
		}
	}
	if evaluated != loginFreeSource {
		t.Fatalf("spray from one /64: %d evaluated, want %d", evaluated, loginFreeSource)
	}
}

// TestLoginNoPasswordAccountCompares: sign-in to an account without a
// password (OIDC only) and to an unknown user runs a full comparison
// against a real bcrypt hash, like a wrong password does.
func TestLoginNoPasswordAccountCompares(t *testing.T) {
	lc := newLoginConsole(t)
	if _, err := lc.store.CreateUser(context.Background(), store.User{Username: "oidc-only", PasswordHash: oidcPasswordHash}); err != nil {
		t.Fatal(err)
	}
	for i, user := range []string{"oidc-only", "nobody"} {
		code, body := lc.login("192.0.2.1:1", user, "any-password")
		if code != http.StatusUnauthorized || !strings.Contains(body, "Wrong username or password.") {
			t.Fatalf("%s: %d %s", user, code, body)
		}
		if got := lc.compares.Load(); got != int64(i+1) {
			t.Fatalf("%s: %d comparisons, want %d", user, got, i+1)
		}
		h := lc.hashesSaw[i]
		if cost, err := bcrypt.Cost(h); err != nil || cost != bcrypt.DefaultCost || !bytes.Equal(h, dummyHash()) {
			t.Fatalf("%s: compared against %q (cost %d, %v), want the dummy bcrypt hash", user, h, cost, err)
		}
	}
}

func TestThrottleBounded(t *testing.T) {
	th := newThrottle(100)
	now := time.Unix(1000, 0)
	for i := 0; i < 1000; i++ {
		th.reserve("192.0.2."+string(rune('0'+i%10)), "spray"+string(rune(i)), now.Add(time.Duration(i)*time.Millisecond))
	}
	if n := th.size(); n > 100 {
		t.Fatalf("throttle holds %d entries, bound 100", n)
	}
	// A key quiet for loginForget starts over.
	th = newThrottle(100)
	for i := 0; i < loginFreePair; i++ {
		th.reserve("a", "u", now)
	}
	if _, ok := th.reserve("a", "u", now); ok {
		t.Fatal("allowed after the free attempts at once")
	}
	if _, ok := th.reserve("a", "u", now.Add(loginDelayMin)); !ok {
		t.Fatal("refused after the first delay")
	}
	if w, ok := th.reserve("a", "u", now.Add(loginDelayMin+time.Second)); ok || w != 2*loginDelayMin-time.Second {
		t.Fatalf("second delay: wait %v ok %v, want %v", w, ok, 2*loginDelayMin-time.Second)
	}
	if _, ok := th.reserve("a", "u", now.Add(loginForget+loginDelayMin)); !ok {
		t.Fatal("still refused after loginForget")
	}
}
