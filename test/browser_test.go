package test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/meshlink/meshlink/agent"
	"github.com/meshlink/meshlink/coordinator"
	"github.com/meshlink/meshlink/internal/tstest"
	"github.com/meshlink/meshlink/test/harness"
	"github.com/meshlink/meshlink/wire"
)

func chromium(t *testing.T) string {
	for _, p := range []string{"/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv("MESHLINK_REQUIRE_BROWSER") == "1" {
		t.Fatal("no Chromium found (MESHLINK_REQUIRE_BROWSER=1); .ci/run installs Debian's chromium")
	}
	t.Skip("no Chromium found; install Debian's chromium to run the browser test")
	return ""
}

// TestConsoleInBrowser drives the console in headless Chromium as a person
// would: log in, approve an agent that is waiting for web login, mint a
// token, and watch a newly exposed service appear on the live graph.
// Screenshots land in test/artifacts/.
func TestConsoleInBrowser(t *testing.T) {
	exe := chromium(t)
	m := harness.NewMesh(t)
	if m.AdminPassword == "" {
		t.Fatal("the coordinator wrote no admin password file at first start")
	}
	artifacts, _ := filepath.Abs(filepath.Join("artifacts", t.Name()))
	os.MkdirAll(artifacts, 0o755)
	shot := func(ctx context.Context, name string) {
		png, err := chromedp.Run(ctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Logf("screenshot %s: %v", name, err)
			return
		}
		os.WriteFile(filepath.Join(artifacts, name+".png"), png, 0o644)
	}

	// An agent joining by web login: it prints an approval URL and waits.
	out := &tstest.Buffer{}
	cfg := m.AgentConfig("laptop", harness.AgentOptions{Token: "-"})
	cfg.Coordinator, cfg.Fingerprint, cfg.Out = m.Coord.URL(), m.Coord.Fingerprint(), out
	cfg.StatsEvery = 200 * time.Millisecond
	a, err := agent.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	started := make(chan error, 1)
	go func() { started <- a.Start(context.Background()) }()
	var approveURL string
	tstest.WaitForNil(t, 10*time.Second, "the agent to print its approval URL", func() error {
		approveURL = regexp.MustCompile(`https://\S+/approve/\S+`).FindString(out.String())
		if approveURL == "" {
			return errors.New("not yet: " + out.String())
		}
		return nil
	})

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("ignore-certificate-errors", true), // the coordinator's self-signed certificate
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 900),
	)
	actx, cancel := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancel()
	ctx, cancel := chromedp.NewContext(actx, chromedp.WithLogf(t.Logf))
	defer cancel()
	ctx, cancel = context.WithTimeout(ctx, 60*time.Second)
	defer cancel()

	base := m.Coord.URL()
	// Log in.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/"),
		chromedp.WaitVisible(`input[name=username]`),
		chromedp.SendKeys(`input[name=username]`, "admin"),
		chromedp.SendKeys(`input[name=password]`, m.AdminPassword),
	); err != nil {
		t.Fatal(err)
	}
	shot(ctx, "1-login")
	// The one-time password opens only "choose a new password".
	if err := chromedp.Do(ctx,
		chromedp.Submit(`input[name=password]`),
		chromedp.WaitVisible(`input[name=new_password]`),
	); err != nil {
		shot(ctx, "2-login-failed")
		t.Fatalf("login: %v", err)
	}
	const newPassword = "the-admins-own-password"
	if err := chromedp.Do(ctx,
		chromedp.SendKeys(`input[name=new_password]`, newPassword),
		chromedp.SendKeys(`input[name=confirm_password]`, newPassword),
	); err != nil {
		t.Fatal(err)
	}
	shot(ctx, "2-new-password")
	if err := chromedp.Do(ctx,
		chromedp.Submit(`input[name=confirm_password]`),
		// The password page has a sign-out form too: wait for the overview.
		chromedp.WaitReady(`tbody[data-live="relays"]`),
	); err != nil {
		shot(ctx, "2-new-password-failed")
		t.Fatalf("new password: %v", err)
	}
	if loc, err := chromedp.Run(ctx, chromedp.Location()); err != nil || !strings.HasSuffix(loc, "/console") {
		t.Fatalf("after the new password the browser is at %q (%v), want the console", loc, err)
	}
	if _, err := os.Stat(filepath.Join(m.Dir(), "coord", coordinator.AdminPasswordFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the one-time password file after the change: %v", err)
	}
	shot(ctx, "2-console")

	// Approve the waiting agent.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(approveURL),
		chromedp.WaitVisible(`form[action^="/approve/"] button.primary`),
	); err != nil {
		t.Fatalf("approve page: %v", err)
	}
	shot(ctx, "3-approve")
	if err := chromedp.Do(ctx, chromedp.Click(`form[action^="/approve/"] button.primary`)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-started:
		if err != nil {
			t.Fatalf("agent after approval: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the agent did not join after approval")
	}

	// Mint a token; the page shows it once.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/console/tokens"),
		chromedp.WaitVisible(`form[action="/console/tokens"] button`),
		chromedp.Click(`form[action="/console/tokens"] button`),
		chromedp.WaitVisible(`#secret`),
	); err != nil {
		t.Fatalf("mint token: %v", err)
	}
	secret, err := chromedp.Run(ctx, chromedp.Value(`#secret`))
	if err != nil {
		t.Fatal(err)
	}
	shot(ctx, "4-token")
	if _, err := wire.ParseToken(secret); err != nil {
		t.Fatalf("minted token %q: %v", secret, err)
	}

	// The overview lists the relays, the coordinator's own first, and the
	// live feed re-renders them (the agent's frequent counters make new
	// snapshots): rows the page was served with are replaced.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/console"),
		chromedp.WaitVisible(`tbody[data-live="relays"] tr[data-relay="coordinator"]`),
		chromedp.WaitVisible(`#live.on`),
	); err != nil {
		t.Fatalf("relays on the overview: %v", err)
	}
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`document.querySelectorAll('tbody[data-live="relays"] tr').forEach((r) => r.dataset.stale = "1"), true`)); err != nil {
		t.Fatal(err)
	}
	tstest.WaitForNil(t, 10*time.Second, "the relays re-rendered live", func() error {
		fresh, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`!!document.querySelector('tbody[data-live="relays"] tr[data-relay="coordinator"]:not([data-stale])')`))
		if err != nil {
			return err
		}
		if !fresh {
			return errors.New("not yet")
		}
		return nil
	})
	relays, err := chromedp.Run(ctx, chromedp.Text(`#relays-table`))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"coordinator", "embedded", base, "SHA256:"} {
		if !strings.Contains(relays, want) {
			t.Errorf("relays table lacks %q: %s", want, relays)
		}
	}
	shot(ctx, "5-relays")

	// Open the graph, then expose a service: it must appear live.
	if err := chromedp.Do(ctx, chromedp.Navigate(base+"/console/graph"), chromedp.WaitReady(`body`)); err != nil {
		t.Fatal(err)
	}
	web := startBackend(t, "web")
	if _, _, err := a.Expose(context.Background(), agent.Export{Name: "shop", Target: web.addr()}); err != nil {
		t.Fatal(err)
	}
	tstest.WaitForNil(t, 20*time.Second, "the service on the live graph", func() error {
		text, err := chromedp.Run(ctx, chromedp.Text(`body`))
		if err != nil {
			return err
		}
		if !strings.Contains(text, "shop") {
			return errors.New("not on the page yet")
		}
		return nil
	})
	shot(ctx, "6-graph")

	// HTTP requests from another site to an HTTP service: the graph's
	// edges and its table of HTTP edges show their rate, errors and
	// latency, live.
	api := startHTTPBackend(t, "laptop")
	if _, _, err := a.Expose(context.Background(), agent.Export{Name: "api", Target: api.addr(), Protocol: "http"}); err != nil {
		t.Fatal(err)
	}
	dcfg := m.AgentConfig("desk", harness.AgentOptions{})
	dcfg.StatsEvery = 200 * time.Millisecond
	desk, err := harness.StartAgent(t, dcfg)
	if err != nil {
		t.Fatal(err)
	}
	apiURL := "http://" + waitProviders(t, desk, "api", 1).Local.String() + "/items"
	hc := keepAliveClient()
	tstest.WaitForNil(t, 30*time.Second, "the api edge's request figures on the live graph", func() error {
		for range 20 {
			if code, _, _, err := get(hc, apiURL); err != nil || code != 200 {
				return fmt.Errorf("GET %s: %d %v", apiURL, code, err)
			}
		}
		rows, err := chromedp.Run(ctx, chromedp.Text(`tbody[data-live="edges"]`))
		if err != nil {
			return err
		}
		if !strings.Contains(rows, "api") || !strings.Contains(rows, "desk") || !strings.Contains(rows, "laptop") ||
			!strings.Contains(rows, " req/s") || strings.Contains(rows, "— req/s") || !strings.Contains(rows, "p99 ") {
			return fmt.Errorf("edges table %q", rows)
		}
		graph, err := chromedp.Run(ctx, chromedp.TextContent(`#graph`))
		if err != nil {
			return err
		}
		if !strings.Contains(graph, "% err") {
			return fmt.Errorf("no HTTP figures on the graph's edges: %q", graph)
		}
		return nil
	})
	shot(ctx, "6b-http-edges")

	// Edit the access policy: a mistake is shown with its line and
	// changes nothing; a good one is saved, says what access it takes
	// away, and the matrix shows it.
	if err := chromedp.Do(ctx,
		chromedp.Navigate(base+"/console/policy"),
		chromedp.WaitVisible(`#policy-matrix`),
		chromedp.SetValue(`#policy-text`, "rules:\n  - from: [group:ops]\n    to: [shop]\n"),
		chromedp.Click(`#policy-save`),
		chromedp.WaitVisible(`#policy-problems`),
	); err != nil {
		t.Fatalf("submit a bad policy: %v", err)
	}
	problems, err := chromedp.Run(ctx, chromedp.Text(`#policy-problems`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(problems, `policy:2: "group:ops": no group "ops" is defined under groups`) {
		t.Errorf("the page says %q", problems)
	}
	if p := m.Coord.Policy(); !p.Default {
		t.Errorf("a refused policy changed the one in force: %+v", p)
	}
	shot(ctx, "7-policy-refused")
	if err := chromedp.Do(ctx,
		chromedp.SetValue(`#policy-text`, "groups:\n  ops: [user:nobody]\nrules:\n  - from: [group:ops]\n    to: [shop]\n"),
		chromedp.Click(`#policy-save`),
		chromedp.WaitVisible(`#policy-saved`),
	); err != nil {
		t.Fatalf("submit a good policy: %v", err)
	}
	saved, err := chromedp.Run(ctx, chromedp.Text(`#policy-saved`))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(saved, "may no longer reach shop") {
		t.Errorf("the saved notice says %q", saved)
	}
	matrix, err := chromedp.Run(ctx, chromedp.Text(`#policy-matrix`))
	if err != nil {
		t.Fatal(err)
	}
	if lm := strings.ToLower(matrix); !strings.Contains(lm, "shop") || !strings.Contains(lm, "deny") || strings.Contains(lm, "allow") {
		t.Errorf("the matrix after the change: %q", matrix)
	}
	if p := m.Coord.Policy(); p.Default || p.UpdatedBy != "admin" {
		t.Errorf("the policy in force after saving: %+v", p)
	}
	shot(ctx, "8-policy-saved")
	t.Logf("screenshots in %s", artifacts)
}
