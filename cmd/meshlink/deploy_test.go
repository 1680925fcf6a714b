//go:build !agentonly

package main

// Checks of what deploy/ and the Dockerfile ship, since no cluster, image
// build or systemd can run here: every manifest decodes strictly into the
// Kubernetes API types, and its wiring agrees with the real CLI (each
// MESHLINK_* variable is a flag of the command the container runs),
// with the health endpoints, the image and the ports.

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshlink/meshlink/agent"
)

const deployDir = "../../deploy"

// commandEnv lists the MESHLINK_* variables that `meshlink NAME` reads:
// its flags' and the app's global ones.
func commandEnv(t *testing.T, name string) map[string]bool {
	t.Helper()
	app := newApp()
	out := map[string]bool{}
	add := func(flags []cli.Flag) {
		for _, f := range flags {
			if ef, ok := f.(interface{ GetEnvVars() []string }); ok {
				for _, e := range ef.GetEnvVars() {
					out[e] = true
				}
			}
		}
	}
	add(app.Flags)
	for _, c := range app.Commands {
		if c.Name == name {
			add(c.Flags)
			return out
		}
	}
	t.Fatalf("meshlink has no command %q", name)
	return nil
}

// kustomization is the part of kustomize's file the manifests use,
// decoded strictly so that a misspelt field fails here.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources,omitempty"`
	Labels     []struct {
		Pairs map[string]string `json:"pairs"`
	} `json:"labels,omitempty"`
	Images []struct {
		Name    string `json:"name"`
		NewName string `json:"newName,omitempty"`
		NewTag  string `json:"newTag,omitempty"`
	} `json:"images,omitempty"`
	Patches []struct {
		Path   string `json:"path"`
		Target struct {
			Kind string `json:"kind"`
			Name string `json:"name"`
		} `json:"target"`
	} `json:"patches,omitempty"`
}

// manifests is everything decoded from deploy/kubernetes.
type manifests struct {
	statefulSets []appsv1.StatefulSet
	deployments  []appsv1.Deployment
	services     []corev1.Service
	configMaps   []corev1.ConfigMap
	ingresses    []networkingv1.Ingress
	patches      map[string]bool // files used as patches, decoded by their target kind
}

func strict(t *testing.T, file string, doc []byte, v any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(doc, v); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
}

func loadManifests(t *testing.T) manifests {
	root := filepath.Join(deployDir, "kubernetes")
	m := manifests{patches: map[string]bool{}}
	var kfiles []string
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if d.Name() == "kustomization.yaml" {
			kfiles = append(kfiles, p)
		}
		return nil
	})
	if len(kfiles) < 4 {
		t.Fatalf("kustomizations: %v", kfiles)
	}
	used := map[string]bool{}
	for _, kf := range kfiles {
		b, err := os.ReadFile(kf)
		if err != nil {
			t.Fatal(err)
		}
		var k kustomization
		strict(t, kf, b, &k)
		if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
			t.Errorf("%s: apiVersion/kind %s/%s", kf, k.APIVersion, k.Kind)
		}
		dir := filepath.Dir(kf)
		for _, r := range k.Resources {
			p := filepath.Join(dir, r)
			fi, err := os.Stat(p)
			if err != nil {
				t.Errorf("%s: resource %s: %v", kf, r, err)
				continue
			}
			if fi.IsDir() {
				if _, err := os.Stat(filepath.Join(p, "kustomization.yaml")); err != nil {
					t.Errorf("%s: resource %s is a directory without a kustomization.yaml", kf, r)
				}
				continue
			}
			used[filepath.Clean(p)] = true
		}
		for _, im := range k.Images {
			if im.Name != "meshlink" && im.Name != "meshlink-agent" || im.NewName == "" || im.NewTag == "" {
				t.Errorf("%s: image %+v: want meshlink or meshlink-agent renamed to a registry and tag", kf, im)
			}
		}
		for _, pt := range k.Patches {
			p := filepath.Clean(filepath.Join(dir, pt.Path))
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatalf("%s: patch %s: %v", kf, pt.Path, err)
			}
			m.patches[p] = true
			switch pt.Target.Kind {
			case "StatefulSet":
				var s appsv1.StatefulSet
				strict(t, p, b, &s)
				if s.Name != pt.Target.Name {
					t.Errorf("%s: patch names %s, target %s", p, s.Name, pt.Target.Name)
				}
				checkContainers(t, p, s.Spec.Template.Spec, false)
			default:
				t.Fatalf("%s: patch of kind %s: teach this test to decode it", kf, pt.Target.Kind)
			}
		}
	}
	filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		p = filepath.Clean(p)
		if d.IsDir() || !strings.HasSuffix(p, ".yaml") || d.Name() == "kustomization.yaml" || m.patches[p] {
			return nil
		}
		if !used[p] {
			t.Errorf("%s is in no kustomization's resources", p)
		}
		b, _ := os.ReadFile(p)
		for i, doc := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			var tm struct {
				Kind string `json:"kind"`
			}
			yaml.Unmarshal([]byte(doc), &tm)
			where := fmt.Sprintf("%s#%d", p, i+1)
			switch tm.Kind {
			case "StatefulSet":
				var s appsv1.StatefulSet
				strict(t, where, []byte(doc), &s)
				m.statefulSets = append(m.statefulSets, s)
			case "Deployment":
				var d appsv1.Deployment
				strict(t, where, []byte(doc), &d)
				m.deployments = append(m.deployments, d)
			case "Service":
				var s corev1.Service
				strict(t, where, []byte(doc), &s)
				m.services = append(m.services, s)
			case "ConfigMap":
				var c corev1.ConfigMap
				strict(t, where, []byte(doc), &c)
				m.configMaps = append(m.configMaps, c)
			case "Ingress":
				var in networkingv1.Ingress
				strict(t, where, []byte(doc), &in)
				m.ingresses = append(m.ingresses, in)
			default:
				t.Errorf("%s: kind %q: teach this test to decode it", where, tm.Kind)
			}
		}
		return nil
	})
	return m
}

// envOf is a container's variables with literal values.
func envOf(c corev1.Container) map[string]string {
	out := map[string]string{}
	for _, e := range c.Env {
		out[e.Name] = e.Value
	}
	return out
}

// agentOnlyCommands are the long-running commands the agent-only image
// (meshlink-agent, make build-agent) can run.
var agentOnlyCommands = map[string]bool{"agent": true, "relay": true}

// checkContainers checks every meshlink container of a pod: its command,
// its variables against that command's flags, and (unless partial, for a
// patch) its probes, ports and mounts.
func checkContainers(t *testing.T, where string, pod corev1.PodSpec, full bool) {
	t.Helper()
	all := append(slices.Clone(pod.InitContainers), pod.Containers...)
	for _, c := range all {
		if c.Image != "meshlink" && c.Image != "meshlink-agent" && full {
			continue
		}
		if c.Image == "meshlink-agent" && len(c.Args) > 0 && !agentOnlyCommands[c.Args[0]] {
			t.Errorf("%s: container %s runs %q from the agent-only image, which has no coordinator", where, c.Name, c.Args[0])
		}
		if full && len(c.Args) == 0 {
			t.Errorf("%s: container %s runs meshlink with no command", where, c.Name)
			continue
		}
		cmd := "coordinator"
		if len(c.Args) > 0 {
			cmd = c.Args[0]
		}
		known := commandEnv(t, cmd)
		for _, e := range c.Env {
			if !known[e.Name] {
				t.Errorf("%s: container %s: %s is not a variable of `meshlink %s`", where, c.Name, e.Name, cmd)
			}
		}
		if !full {
			continue
		}
		env := envOf(c)
		checkMounts(t, where, pod, c, env)
		ports := map[string]int32{}
		for _, p := range c.Ports {
			ports[p.Name] = p.ContainerPort
		}
		portOf := func(p *corev1.Probe) int32 {
			if p == nil || p.HTTPGet == nil {
				t.Errorf("%s: container %s: want an httpGet probe, have %+v", where, c.Name, p)
				return 0
			}
			if p.HTTPGet.Port.StrVal != "" {
				n, ok := ports[p.HTTPGet.Port.StrVal]
				if !ok {
					t.Errorf("%s: container %s: probe port %q is not a named port", where, c.Name, p.HTTPGet.Port.StrVal)
				}
				return n
			}
			return p.HTTPGet.Port.IntVal
		}
		listenPort := func(v string) int32 {
			_, port, err := net.SplitHostPort(env[v])
			n, _ := strconv.Atoi(port)
			if err != nil || n == 0 {
				t.Errorf("%s: container %s: %s=%q is not HOST:PORT", where, c.Name, v, env[v])
			}
			return int32(n)
		}
		switch cmd {
		case "agent":
			hp := listenPort("MESHLINK_HEALTH_LISTEN")
			if host, _, _ := net.SplitHostPort(env["MESHLINK_HEALTH_LISTEN"]); host != "0.0.0.0" && host != "" {
				t.Errorf("%s: container %s: the kubelet probes the pod's address; MESHLINK_HEALTH_LISTEN=%s is not reachable by it", where, c.Name, env["MESHLINK_HEALTH_LISTEN"])
			}
			for _, pr := range []struct {
				name string
				p    *corev1.Probe
				path string
			}{{"liveness", c.LivenessProbe, "/healthz"}, {"readiness", c.ReadinessProbe, "/readyz"}} {
				if portOf(pr.p) != hp || pr.p.HTTPGet.Path != pr.path {
					t.Errorf("%s: container %s: %s probe %+v; want %s on port %d", where, c.Name, pr.name, pr.p.HTTPGet, pr.path, hp)
				}
			}
			if c.StartupProbe != nil && (portOf(c.StartupProbe) != hp || c.StartupProbe.HTTPGet.Path != "/readyz") {
				t.Errorf("%s: container %s: startup probe %+v; want /readyz on %d", where, c.Name, c.StartupProbe.HTTPGet, hp)
			}
			if d := env["MESHLINK_DRAIN_TIMEOUT"]; d != "" {
				if pod.TerminationGracePeriodSeconds == nil {
					t.Errorf("%s: a drain timeout of %s but the default grace period", where, d)
				}
			}
			if e := env["MESHLINK_EXPOSE"]; e != "" {
				if _, err := agent.ParseExport(e); err != nil {
					t.Errorf("%s: MESHLINK_EXPOSE: %v", where, err)
				}
			}
		case "coordinator":
			lp := listenPort("MESHLINK_LISTEN")
			if !strings.HasPrefix(env["MESHLINK_LISTEN"], "0.0.0.0:") {
				t.Errorf("%s: the coordinator listens on %s; others cannot reach it", where, env["MESHLINK_LISTEN"])
			}
			if !strings.HasPrefix(env["MESHLINK_URL"], "https://") {
				t.Errorf("%s: MESHLINK_URL %q: tokens need the public https URL", where, env["MESHLINK_URL"])
			}
			for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe} {
				if portOf(p) != lp || p.HTTPGet.Path != "/healthz" || p.HTTPGet.Scheme != corev1.URISchemeHTTPS {
					t.Errorf("%s: coordinator probe %+v; want HTTPS /healthz on %d", where, p.HTTPGet, lp)
				}
			}
			var tcp, udp bool
			for _, p := range c.Ports {
				tcp = tcp || p.ContainerPort == lp && p.Protocol == corev1.ProtocolTCP
				udp = udp || p.ContainerPort == lp && p.Protocol == corev1.ProtocolUDP
			}
			if !tcp || !udp {
				t.Errorf("%s: the coordinator's port %d wants TCP (HTTPS) and UDP (STUN); ports %+v", where, lp, c.Ports)
			}
		}
	}
}

// checkMounts: every mount has its volume, and every file a variable
// names lies on a mount (the join token on its Secret's key).
func checkMounts(t *testing.T, where string, pod corev1.PodSpec, c corev1.Container, env map[string]string) {
	t.Helper()
	vols := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		vols[v.Name] = v
	}
	mountOf := func(path string) (corev1.VolumeMount, bool) {
		for _, m := range c.VolumeMounts {
			if strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/") {
				return m, true
			}
		}
		return corev1.VolumeMount{}, false
	}
	for _, v := range []string{"MESHLINK_STATE", "MESHLINK_DATA", "MESHLINK_JOIN_FILE", "MESHLINK_EXPOSE_FROM_FILE"} {
		p, ok := env[v]
		if !ok {
			continue
		}
		m, ok := mountOf(p)
		if !ok {
			t.Errorf("%s: container %s: %s=%s is on no volume mount (the root file system is read-only)", where, c.Name, v, p)
			continue
		}
		vol, isPodVol := vols[m.Name]
		rel := strings.TrimPrefix(p, strings.TrimSuffix(m.MountPath, "/")+"/")
		switch v {
		case "MESHLINK_JOIN_FILE":
			if !isPodVol || vol.Secret == nil || !slices.ContainsFunc(vol.Secret.Items, func(k corev1.KeyToPath) bool { return k.Path == rel }) {
				t.Errorf("%s: %s=%s is not a key of a Secret volume", where, v, p)
			}
		case "MESHLINK_EXPOSE_FROM_FILE":
			if !isPodVol || vol.ConfigMap == nil || m.SubPath != "" {
				t.Errorf("%s: %s=%s wants a ConfigMap volume mounted as a directory (a subPath sees no edits)", where, v, p)
			}
		}
	}
	for _, m := range c.VolumeMounts {
		if _, ok := vols[m.Name]; !ok && m.Name != "data" {
			t.Errorf("%s: container %s mounts %s, which is no volume", where, c.Name, m.Name)
		}
	}
}

func TestKubernetesManifests(t *testing.T) {
	m := loadManifests(t)
	if len(m.statefulSets) != 1 || len(m.deployments) != 2 || len(m.ingresses) != 1 {
		t.Fatalf("found %d StatefulSets, %d Deployments, %d Ingresses; want the coordinator, the example app and the gateway, one Ingress",
			len(m.statefulSets), len(m.deployments), len(m.ingresses))
	}
	services := map[string]corev1.Service{}
	for _, s := range m.services {
		services[s.Name] = s
	}
	// Every Service selects a workload, and its target ports are that
	// workload's ports.
	pods := map[string]corev1.PodTemplateSpec{}
	for _, s := range m.statefulSets {
		pods[s.Name] = s.Spec.Template
		checkContainers(t, "StatefulSet "+s.Name, s.Spec.Template.Spec, true)
		if _, ok := services[s.Spec.ServiceName]; !ok {
			t.Errorf("StatefulSet %s: serviceName %s is no Service", s.Name, s.Spec.ServiceName)
		}
		if *s.Spec.Replicas != 1 {
			t.Errorf("StatefulSet %s: %d replicas; the coordinator's SQLite store has one writer", s.Name, *s.Spec.Replicas)
		}
		if len(s.Spec.VolumeClaimTemplates) != 1 || s.Spec.VolumeClaimTemplates[0].Name != "data" {
			t.Errorf("StatefulSet %s: want one PVC template named data", s.Name)
		}
	}
	for _, d := range m.deployments {
		pods[d.Name] = d.Spec.Template
		checkContainers(t, "Deployment "+d.Name, d.Spec.Template.Spec, true)
	}
	for _, s := range m.services {
		found := false
		for name, p := range pods {
			match := len(s.Spec.Selector) > 0
			for k, v := range s.Spec.Selector {
				match = match && p.Labels[k] == v
			}
			if !match {
				continue
			}
			found = true
			for _, sp := range s.Spec.Ports {
				ok := false
				for _, c := range p.Spec.Containers {
					for _, cp := range c.Ports {
						ok = ok || cp.Protocol == sp.Protocol && (cp.Name == sp.TargetPort.StrVal || cp.ContainerPort == sp.TargetPort.IntVal)
					}
				}
				if !ok {
					t.Errorf("Service %s port %s: target %s/%s is no port of %s", s.Name, sp.Name, sp.TargetPort.String(), sp.Protocol, name)
				}
			}
		}
		if !found {
			t.Errorf("Service %s selects no workload", s.Name)
		}
	}
	for _, in := range m.ingresses {
		for _, r := range in.Spec.Rules {
			for _, p := range r.HTTP.Paths {
				s, ok := services[p.Backend.Service.Name]
				if !ok || !slices.ContainsFunc(s.Spec.Ports, func(sp corev1.ServicePort) bool { return sp.Name == p.Backend.Service.Port.Name }) {
					t.Errorf("Ingress %s: backend %+v is no Service port", in.Name, p.Backend.Service)
				}
			}
		}
		if in.Annotations["nginx.ingress.kubernetes.io/ssl-passthrough"] != "true" {
			t.Errorf("Ingress %s: the coordinator terminates its own TLS (agents pin it): want ssl-passthrough", in.Name)
		}
	}
	// The example app: the agent as a native sidecar, DNS through it.
	web := pods["web"].Spec
	if len(web.InitContainers) != 1 || web.InitContainers[0].RestartPolicy == nil || *web.InitContainers[0].RestartPolicy != corev1.ContainerRestartPolicyAlways {
		t.Errorf("the example app's agent is not a native sidecar (an init container with restartPolicy: Always)")
	}
	if web.DNSPolicy != corev1.DNSNone || web.DNSConfig == nil || !slices.Equal(web.DNSConfig.Nameservers, []string{"127.0.0.1"}) {
		t.Errorf("the example app does not resolve through its sidecar: %v %+v", web.DNSPolicy, web.DNSConfig)
	}
	if env := envOf(web.InitContainers[0]); env["MESHLINK_DNS"] != "127.0.0.1:53" {
		t.Errorf("the sidecar serves DNS on %q; the pod's resolv.conf says 127.0.0.1 (port 53)", env["MESHLINK_DNS"])
	}
	// The gateway's list decodes as the agent decodes it.
	gw := pods["meshlink-gateway"].Spec
	for _, v := range gw.Volumes {
		if v.ConfigMap == nil {
			continue
		}
		i := slices.IndexFunc(m.configMaps, func(c corev1.ConfigMap) bool { return c.Name == v.ConfigMap.Name })
		if i < 0 {
			t.Fatalf("the gateway mounts ConfigMap %s, which is not in the manifests", v.ConfigMap.Name)
		}
		file := filepath.Base(envOf(gw.Containers[0])["MESHLINK_EXPOSE_FROM_FILE"])
		es, err := agent.ParseExposeFile([]byte(m.configMaps[i].Data[file]))
		if err != nil || len(es) == 0 {
			t.Errorf("ConfigMap %s key %s: %v (%d services)", v.ConfigMap.Name, file, err, len(es))
		}
	}
}

// TestDockerfile: the image's variables are flags, it declares the state
// volume, the coordinator's ports and a health check the binary runs,
// stamps the version, and .dockerignore keeps secrets and history out.
func TestDockerfile(t *testing.T) {
	b, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := string(b)
	known := commandEnv(t, "agent")
	for k := range commandEnv(t, "coordinator") {
		known[k] = true
	}
	for k := range commandEnv(t, "healthcheck") {
		known[k] = true
	}
	vars := regexp.MustCompile(`\b(MESHLINK_[A-Z_]+)=`).FindAllStringSubmatch(df, -1)
	if len(vars) < 2 {
		t.Fatalf("the Dockerfile sets no MESHLINK_* variables: %v", vars)
	}
	for _, v := range vars {
		if !known[v[1]] {
			t.Errorf("Dockerfile: %s is no flag's variable", v[1])
		}
	}
	for _, want := range []string{
		"-X main.version=${VERSION}", "-X main.commit=${COMMIT}", `VOLUME ["/var/lib/meshlink"]`,
		"EXPOSE 8443/tcp 8443/udp", `CMD ["/meshlink", "healthcheck"]`, `ENTRYPOINT ["/meshlink"]`, "USER 65532",
	} {
		if !strings.Contains(df, want) {
			t.Errorf("Dockerfile lacks %q", want)
		}
	}
	if !strings.Contains(defaultHealthURL, ":8443/") {
		t.Errorf("healthcheck's default %s is not the exposed coordinator port", defaultHealthURL)
	}
	ig, err := os.ReadFile("../../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(ig))
	for _, want := range []string{".git", "bin/", "demo/", "**/meshlink-state/", "**/*.key"} {
		if !slices.Contains(lines, want) {
			t.Errorf(".dockerignore lacks %s", want)
		}
	}
}

// TestSystemdUnits checks the units with systemd-analyze verify (their
// ExecStart pointed at an executable, this test binary) and their
// variables against the CLI.
func TestSystemdUnits(t *testing.T) {
	units, _ := filepath.Glob(filepath.Join(deployDir, "systemd", "*.service"))
	if len(units) != 2 {
		t.Fatalf("units: %v", units)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, u := range units {
		b, err := os.ReadFile(u)
		if err != nil {
			t.Fatal(err)
		}
		cmd := regexp.MustCompile(`(?m)^ExecStart=/usr/local/bin/meshlink (\w+)$`).FindSubmatch(b)
		if cmd == nil {
			t.Fatalf("%s: no ExecStart=/usr/local/bin/meshlink COMMAND (make install rewrites that path)", u)
		}
		known := commandEnv(t, string(cmd[1]))
		for _, v := range regexp.MustCompile(`(?m)^Environment=(MESHLINK_[A-Z_]+)=`).FindAllSubmatch(b, -1) {
			if !known[string(v[1])] {
				t.Errorf("%s: %s is not a variable of `meshlink %s`", u, v[1], cmd[1])
			}
		}
		for _, want := range []string{"ProtectSystem=strict", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "DynamicUser=yes", "StateDirectory=meshlink"} {
			if !bytes.Contains(b, []byte("\n"+want)) {
				t.Errorf("%s lacks %s", u, want)
			}
		}
		if man := regexp.MustCompile(`man:(meshlink-\w+)\(1\)`).FindSubmatch(b); man == nil {
			t.Errorf("%s: Documentation names no man page", u)
		} else if _, err := os.Stat(filepath.Join("../../docs/man", string(man[1])+".1")); err != nil {
			t.Errorf("%s: man page %s: %v", u, man[1], err)
		}
		os.WriteFile(filepath.Join(dir, filepath.Base(u)), bytes.ReplaceAll(b, []byte("/usr/local/bin/meshlink"), []byte(exe)), 0o644)
	}
	agentUnit, _ := os.ReadFile(filepath.Join(deployDir, "systemd", "meshlink-agent.service"))
	if !bytes.Contains(agentUnit, []byte("\nLoadCredential=join-token:")) || !bytes.Contains(agentUnit, []byte("\nEnvironment=MESHLINK_JOIN_FILE=%d/join-token")) {
		t.Error("the agent unit does not hand the token over with LoadCredential")
	}
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		if os.Getenv("MESHLINK_REQUIRE_NETNS") == "1" {
			t.Fatalf("systemd-analyze is needed (the systemd package; .ci/run installs it): %v", err)
		}
		t.Skipf("systemd-analyze not installed (the systemd package; .ci/run installs it): %v", err)
	}
	// --man=no: the man pages are checked above, in the tree; they are
	// installed only by make install.
	args := append([]string{"verify", "--man=no"}, must(filepath.Glob(filepath.Join(dir, "*.service")))...)
	out, err := exec.Command(sa, args...).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
