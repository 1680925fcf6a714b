package agent

// Gateway mode: the services to export read from a YAML file
// (--expose-from-file) and read again whenever it changes, so that one
// agent can carry dozens of services of its network. A file that fails to
// read or to decode keeps the last good set, and the log says why.

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"sigs.k8s.io/yaml"
)

// Bounds of an expose file: far beyond the coordinator's services per
// node (64 by default), small enough to read every few seconds.
const (
	maxExposeFile    = 1 << 20
	maxExposeEntries = 1024
	// exposeFileEvery is how often the file is read again by default.
	exposeFileEvery = 2 * time.Second
)

// exposeEntry is one item of the file's list.
type exposeEntry struct {
	// Name is the service name in the mesh.
	Name string `json:"name"`
	// Target is HOST:PORT that the gateway reaches on its own network.
	Target string `json:"target"`
	// Port is the port consumers use; default the target's.
	Port uint16 `json:"port,omitempty"`
}

// ParseExposeFile decodes an expose file: a YAML list of services, each
// with name and target (HOST:PORT) and optionally port, as in
//
//   - name: db
//     target: 10.1.2.3:5432
//   - name: legacy-web
//     target: 10.1.2.9:80
//     port: 8080
//
// Decoding is strict: an unknown or repeated key, a duplicate name or port,
// or a bad target is an error that names the entry. An empty file or an
// empty list exports nothing.
func ParseExposeFile(b []byte) ([]Export, error) {
	if len(b) > maxExposeFile {
		return nil, fmt.Errorf("larger than %d KiB; split the services over several gateways", maxExposeFile>>10)
	}
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, nil
	}
	var entries []exposeEntry
	if err := yaml.UnmarshalStrict(b, &entries); err != nil {
		return nil, fmt.Errorf("%w; want a YAML list of entries with name, target (HOST:PORT) and optionally port", err)
	}
	if len(entries) > maxExposeEntries {
		return nil, fmt.Errorf("%d services, more than %d; split them over several gateways", len(entries), maxExposeEntries)
	}
	out := make([]Export, 0, len(entries))
	names, ports := map[string]int{}, map[uint16]int{}
	for i, en := range entries {
		e, err := checkExport(Export{Name: en.Name, Target: en.Target, Port: en.Port})
		if err != nil {
			return nil, fmt.Errorf("entry %d: %w", i+1, err)
		}
		if j, dup := names[e.Name]; dup {
			return nil, fmt.Errorf("entry %d: service %s is also entry %d; give each service once", i+1, e.Name, j)
		}
		if j, dup := ports[e.Port]; dup {
			return nil, fmt.Errorf("entry %d: service %s: mesh port %d is also used by entry %d; set another port", i+1, e.Name, e.Port, j)
		}
		names[e.Name], ports[e.Port] = i+1, i+1
		out = append(out, e)
	}
	return out, nil
}

// readExposeFile reads and parses path, bounded in size.
func readExposeFile(path string) ([]byte, []Export, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, fmt.Errorf("--expose-from-file: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxExposeFile+1))
	if err != nil {
		return nil, nil, fmt.Errorf("--expose-from-file %s: %w", path, err)
	}
	es, err := ParseExposeFile(b)
	if err != nil {
		return b, nil, fmt.Errorf("--expose-from-file %s: %w", path, err)
	}
	return b, es, nil
}

// setFileExports makes es the services exported from the expose file,
// replacing the previous set whole; on error nothing changes.
func (a *Agent) setFileExports(es []Export) error {
	a.mu.Lock()
	if a.left {
		a.mu.Unlock()
		return errLeft
	}
	saved := a.exports
	a.exports = slices.DeleteFunc(slices.Clone(a.exports), func(x Export) bool { return a.fromFile[x.Name] })
	from := make(map[string]bool, len(es))
	for _, e := range es {
		err := error(nil)
		if a.fromConfig[e.Name] {
			err = fmt.Errorf("service %s is also given by --expose; give it one way only", e.Name)
		} else {
			err = a.addExportLocked(e, true)
		}
		if err != nil {
			a.exports = saved
			a.mu.Unlock()
			return err
		}
		from[e.Name] = true
	}
	a.fromFile = from
	exports := a.runtimeExports(a.exports)
	started := a.cc != nil
	a.reconfigLocked()
	a.mu.Unlock()
	// A runtime export the file took over is no longer saved.
	if err := a.state.saveJSON(fileServices, exports); err != nil {
		a.log.Warn("cannot save the exports", "err", err)
	}
	if started {
		a.goroutine("sync-exports", a.syncExports)
	}
	return nil
}

// exposeFileLoop reads the expose file again every interval and applies
// it when its bytes changed. A file that cannot be read or decoded, or a
// set that cannot be applied, keeps the last good set; each distinct
// failure is logged once.
func (a *Agent) exposeFileLoop(last []byte) {
	every := a.cfg.ExposeFileEvery
	if every <= 0 {
		every = exposeFileEvery
	}
	t := time.NewTicker(every)
	defer t.Stop()
	var lastErr string
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
		}
		b, es, err := readExposeFile(a.cfg.ExposeFile)
		if err == nil && bytes.Equal(b, last) {
			lastErr = ""
			continue
		}
		if err == nil {
			err = a.setFileExports(es)
		}
		if errors.Is(err, errLeft) {
			return
		}
		if err != nil {
			if msg := err.Error(); msg != lastErr {
				lastErr = msg
				a.log.Error("expose file not applied; keeping the services of its last good version", "file", a.cfg.ExposeFile, "err", err)
			}
			continue
		}
		last, lastErr = b, ""
		names := make([]string, len(es))
		for i, e := range es {
			names[i] = e.Name
		}
		a.log.Info("expose file applied", "file", a.cfg.ExposeFile, "services", len(es), "names", names)
	}
}
