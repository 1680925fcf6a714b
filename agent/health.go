package agent

import (
	"context"
	"fmt"
	"time"

	"github.com/meshlink/meshlink/agent/proxy"
	"github.com/meshlink/meshlink/internal/backoff"
	"github.com/meshlink/meshlink/wire"
)

// healthChanged asks healthLoop to report the exports' health; the
// provider's checkers call it on every change.
func (a *Agent) healthChanged() {
	select {
	case a.healthDirty <- struct{}{}:
	default:
	}
}

// healthLoop reports the exports' health to the coordinator whenever it
// changed, whole (wire.HealthReport), retrying with backoff while the
// coordinator cannot be reached or asks to slow down. Changes that come
// while a report is in flight coalesce into the next.
func (a *Agent) healthLoop() {
	bo := a.retryBackoff()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-a.healthDirty:
		}
		rep := wire.HealthReport{Version: wire.ProtocolVersion, Services: []wire.ServiceHealth{}}
		for _, h := range a.provider.Health() {
			if h.Checked {
				rep.Services = append(rep.Services, wire.ServiceHealth{Name: h.Name, Healthy: h.Healthy, Error: h.Error})
			}
		}
		if len(rep.Services) > wire.MaxHealthServices {
			rep.Services = rep.Services[:wire.MaxHealthServices]
		}
		ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
		err := a.control().call(ctx, wire.PathHealth, rep, nil)
		cancel()
		if err == nil {
			bo.Reset()
			continue
		}
		a.log.Debug("cannot report health now; will retry", "err", err)
		if isPermanent(err) && !isRateLimited(err) {
			continue // an older coordinator, or a refusal retrying cannot fix
		}
		if !backoff.Sleep(a.ctx, bo.Next()) {
			return
		}
		a.healthChanged()
	}
}

func isRateLimited(err error) bool {
	ae, ok := err.(*apiError)
	return ok && ae.Status == 429
}

// checkExportNow checks an export's target once, as its health spec says,
// for `meshlink expose` to warn at once; "" when it answers.
func checkExportNow(ctx context.Context, e Export) string {
	if !wire.HasTCP(e.Protocol) && e.Health == "" {
		return "" // a UDP target cannot be checked without speaking its protocol
	}
	spec, err := proxy.ParseHealth(e.Health)
	if err != nil || spec.Kind == proxy.HealthNone {
		spec = proxy.HealthSpec{Kind: proxy.HealthTCP}
	}
	if err := proxy.CheckTarget(ctx, e.Target, spec, proxy.DefaultHealthTimeout); err != nil {
		return fmt.Sprintf("the target %s does not answer (%v): consumers are sent to other providers until it does; is the service running?", e.Target, err)
	}
	return ""
}
