// Package deploy holds tether's deployment kit (systemd, sysctl,
// Kubernetes, Prometheus, Grafana, the Dockerfile at the repository root)
// and the tests that keep it true to the binaries: every Kubernetes
// manifest decodes strictly into the Kubernetes API types, and its flags,
// ports and probes agree with what bin/proxy, bin/tether-agent and
// bin/gateway-stub accept (make build first; make test does).
//
// It is a module of its own so that the Kubernetes API types are a
// dependency of these tests only, not of tether.
package deploy

import (
	"bytes"
	"debug/elf"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// manifests are the decoded objects of deploy/kubernetes, by kind.
type manifests struct {
	deployments  []appsv1.Deployment
	statefulSets []appsv1.StatefulSet
	services     []corev1.Service
	configMaps   []corev1.ConfigMap
	pdbs         []policyv1.PodDisruptionBudget
}

// grow appends a zero T to *s and returns it, to be decoded into before
// the next append.
func grow[T any](s *[]T) *T {
	*s = append(*s, *new(T))
	return &(*s)[len(*s)-1]
}

// decodeStrict fills out from one YAML document, refusing unknown or
// misspelt fields and duplicate keys.
func decodeStrict(doc []byte, out any) error {
	return yaml.UnmarshalStrict(doc, out)
}

func loadManifests(t *testing.T) manifests {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests in deploy/kubernetes: %v", err)
	}
	var m manifests
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range bytes.Split(raw, []byte("\n---\n")) {
			if len(bytes.TrimSpace(doc)) == 0 {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal(doc, &tm); err != nil {
				t.Fatalf("%s document %d: %v", f, i+1, err)
			}
			var obj any
			switch tm.APIVersion + " " + tm.Kind {
			case "apps/v1 Deployment":
				obj = grow(&m.deployments)
			case "apps/v1 StatefulSet":
				obj = grow(&m.statefulSets)
			case "v1 Service":
				obj = grow(&m.services)
			case "v1 ConfigMap":
				obj = grow(&m.configMaps)
			case "policy/v1 PodDisruptionBudget":
				obj = grow(&m.pdbs)
			default:
				t.Fatalf("%s document %d: unexpected %s %s", f, i+1, tm.APIVersion, tm.Kind)
			}
			if err := decodeStrict(doc, obj); err != nil {
				t.Fatalf("%s document %d (%s): %v", f, i+1, tm.Kind, err)
			}
		}
	}
	return m
}

// binary is the path of a binary make build wrote.
func binary(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "bin", name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s: %v (run make build first)", p, err)
	}
	return p
}

// flagsOf lists the flags a binary's --help documents.
func flagsOf(t *testing.T, bin string) map[string]bool {
	t.Helper()
	out, _ := exec.Command(bin, "--help").CombinedOutput()
	flags := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^  --([a-z0-9-]+)`).FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
	}
	if len(flags) < 5 {
		t.Fatalf("%s --help lists %d flags:\n%s", bin, len(flags), out)
	}
	return flags
}

// args parses --name=value arguments (every manifest writes them so).
func args(t *testing.T, what string, list []string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, a := range list {
		name, value, ok := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !strings.HasPrefix(a, "--") || !ok {
			t.Fatalf("%s: argument %q: want --name=value", what, a)
		}
		if _, dup := out[name]; dup {
			t.Fatalf("%s: --%s given twice", what, name)
		}
		out[name] = value
	}
	return out
}

func checkFlags(t *testing.T, what string, given map[string]string, known map[string]bool) {
	t.Helper()
	for name := range given {
		if !known[name] {
			t.Errorf("%s: --%s is not a flag of this binary", what, name)
		}
	}
}

// portOf is the port of a HOST:PORT flag value.
func portOf(t *testing.T, what, hostPort string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(hostPort)
	if err != nil {
		t.Fatalf("%s %q: %v", what, hostPort, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s %q: %v", what, hostPort, err)
	}
	return int32(n)
}

func container(t *testing.T, pod corev1.PodSpec, name string) corev1.Container {
	t.Helper()
	for _, c := range pod.Containers {
		if c.Name == name {
			return c
		}
	}
	t.Fatalf("no container %q", name)
	return corev1.Container{}
}

// namedPort resolves a container port by name.
func namedPort(t *testing.T, c corev1.Container, name string, proto corev1.Protocol) int32 {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name && (p.Protocol == proto || (p.Protocol == "" && proto == corev1.ProtocolTCP)) {
			return p.ContainerPort
		}
	}
	t.Fatalf("container %s has no %s port named %q", c.Name, proto, name)
	return 0
}

func selects(t *testing.T, sel *metav1.LabelSelector, podLabels map[string]string) bool {
	t.Helper()
	s, err := metav1.LabelSelectorAsSelector(sel)
	if err != nil {
		t.Fatal(err)
	}
	return s.Matches(labels.Set(podLabels))
}

// imagePaths are the executables the Dockerfile installs.
func imagePaths(t *testing.T) (paths map[string]bool, entrypoint string) {
	t.Helper()
	raw, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	paths = map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^COPY --from=build /out/\S+ (\S+)$`).FindAllStringSubmatch(string(raw), -1) {
		paths[m[1]] = true
	}
	if m := regexp.MustCompile(`(?m)^ENTRYPOINT \["([^"]+)"\]`).FindStringSubmatch(string(raw)); m != nil {
		entrypoint = m[1]
	}
	if len(paths) == 0 || entrypoint == "" {
		t.Fatal("Dockerfile: no COPY --from=build lines or no ENTRYPOINT")
	}
	return paths, entrypoint
}

// TestProxyDeployment: the proxy Deployment's flags are the proxy's, and
// its configuration passes --check-config; ports, probes, the preStop
// pause, the grace period, the PodDisruptionBudget and the Services agree
// with those flags.
func TestProxyDeployment(t *testing.T) {
	m := loadManifests(t)
	if len(m.deployments) != 1 {
		t.Fatalf("%d Deployments, want the proxy's", len(m.deployments))
	}
	d := m.deployments[0]
	pod := d.Spec.Template.Spec
	c := container(t, pod, "proxy")
	paths, entry := imagePaths(t)
	if len(c.Command) != 0 && !paths[c.Command[0]] {
		t.Errorf("proxy command %v is not in the image", c.Command)
	}
	if len(c.Command) == 0 && entry != "/usr/local/bin/tether-proxy" {
		t.Errorf("proxy relies on the image entrypoint %s", entry)
	}
	proxy := binary(t, "proxy")
	a := args(t, "proxy", c.Args)
	checkFlags(t, "proxy", a, flagsOf(t, proxy))

	// The container's configuration is valid for this build.
	dir := t.TempDir()
	if len(m.configMaps) != 1 {
		t.Fatalf("%d ConfigMaps, want the proxy's", len(m.configMaps))
	}
	if err := os.WriteFile(filepath.Join(dir, "proxy.yaml"), []byte(m.configMaps[0].Data["proxy.yaml"]), 0o600); err != nil {
		t.Fatal(err)
	}
	secrets := map[string]string{"admin-token": "admin-secret", "lookup-token": "lookup-secret", "gossip-key": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}
	for name, v := range secrets {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	var check []string
	for _, arg := range c.Args {
		arg = strings.ReplaceAll(arg, "$(POD_IP)", "10.1.2.3")
		arg = strings.ReplaceAll(arg, "$(POD_NAME)", "tether-proxy-abc12")
		arg = strings.ReplaceAll(arg, "/etc/tether/secrets/", dir+"/")
		arg = strings.ReplaceAll(arg, "/etc/tether/proxy.yaml", filepath.Join(dir, "proxy.yaml"))
		check = append(check, arg)
	}
	if out, err := exec.Command(proxy, append(check, "--check-config")...).CombinedOutput(); err != nil {
		t.Fatalf("proxy %s --check-config: %v\n%s", strings.Join(check, " "), err, out)
	}
	for _, env := range c.Env {
		if env.ValueFrom == nil || env.ValueFrom.FieldRef == nil {
			t.Errorf("env %s is not from the downward API", env.Name)
		}
	}

	// Ports named in the flags.
	if p := namedPort(t, c, "clients", corev1.ProtocolTCP); p != portOf(t, "--listen", a["listen"]) {
		t.Errorf("clients port %d, --listen %s", p, a["listen"])
	}
	adminPort := namedPort(t, c, "admin", corev1.ProtocolTCP)
	if adminPort != portOf(t, "--admin", a["admin"]) {
		t.Errorf("admin port %d, --admin %s", adminPort, a["admin"])
	}
	gossip := portOf(t, "--gossip-bind", a["gossip-bind"])
	for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP} {
		if p := namedPort(t, c, "gossip-"+strings.ToLower(string(proto)), proto); p != gossip {
			t.Errorf("gossip %s port %d, --gossip-bind %s", proto, p, a["gossip-bind"])
		}
	}

	// Probes on the admin port.
	for _, pr := range []struct {
		what  string
		probe *corev1.Probe
		path  string
	}{{"readiness", c.ReadinessProbe, "/readyz"}, {"liveness", c.LivenessProbe, "/healthz"}} {
		if pr.probe == nil || pr.probe.HTTPGet == nil {
			t.Errorf("%s probe is not an HTTP GET", pr.what)
			continue
		}
		g := pr.probe.HTTPGet
		if g.Path != pr.path || (g.Port.StrVal != "admin" && g.Port.IntVal != adminPort) {
			t.Errorf("%s probe GET %s on %s, want %s on the admin port", pr.what, g.Path, g.Port.String(), pr.path)
		}
	}

	// Grace period covers the preStop pause and the paced drain.
	drain, err := time.ParseDuration(a["drain-timeout"])
	if err != nil {
		t.Fatalf("--drain-timeout %q: %v", a["drain-timeout"], err)
	}
	var pause time.Duration
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || c.Lifecycle.PreStop.Sleep == nil {
		t.Error("no preStop pause before SIGTERM starts the drain")
	} else {
		pause = time.Duration(c.Lifecycle.PreStop.Sleep.Seconds) * time.Second
	}
	grace := time.Duration(*pod.TerminationGracePeriodSeconds) * time.Second
	if grace < pause+drain+5*time.Second {
		t.Errorf("terminationGracePeriodSeconds %v < preStop %v + --drain-timeout %v + 5s", grace, pause, drain)
	}
	if d.Spec.Strategy.RollingUpdate == nil || d.Spec.Strategy.RollingUpdate.MaxUnavailable.IntValue() != 0 {
		t.Error("rolling update may take a proxy away before its replacement serves (want maxUnavailable 0)")
	}

	// PodDisruptionBudget and the client Service select the proxy pods.
	podLabels := d.Spec.Template.Labels
	if !selects(t, d.Spec.Selector, podLabels) {
		t.Error("the Deployment's selector does not match its pods")
	}
	if len(m.pdbs) != 1 || !selects(t, m.pdbs[0].Spec.Selector, podLabels) || m.pdbs[0].Spec.MaxUnavailable == nil {
		t.Error("no PodDisruptionBudget with maxUnavailable selecting the proxy pods")
	}
	var clientSvc, gossipSvc *corev1.Service
	for i, s := range m.services {
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			gossipSvc = &m.services[i]
		} else {
			clientSvc = &m.services[i]
		}
	}
	if clientSvc == nil || !labels.SelectorFromSet(clientSvc.Spec.Selector).Matches(labels.Set(podLabels)) {
		t.Fatal("no client Service selecting the proxy pods")
	}
	for _, p := range clientSvc.Spec.Ports {
		if p.TargetPort.StrVal != "clients" {
			t.Errorf("client Service port %s targets %s, want the clients port", p.Name, p.TargetPort.String())
		}
	}

	// The gossip Service is headless, publishes unready pods (a proxy is
	// ready only after gossip), selects proxies and gateways, and is what
	// --join names.
	if gossipSvc == nil || !gossipSvc.Spec.PublishNotReadyAddresses {
		t.Fatal("no headless gossip Service publishing not-ready pods")
	}
	host, port, _ := net.SplitHostPort(a["join"])
	if host != gossipSvc.Name || port != strconv.Itoa(int(gossip)) {
		t.Errorf("--join %s, gossip Service %s port %d", a["join"], gossipSvc.Name, gossip)
	}
	gsel := labels.SelectorFromSet(gossipSvc.Spec.Selector)
	if !gsel.Matches(labels.Set(podLabels)) {
		t.Error("the gossip Service does not select the proxy pods")
	}
	for _, s := range m.statefulSets {
		if !gsel.Matches(labels.Set(s.Spec.Template.Labels)) {
			t.Errorf("the gossip Service does not select %s's pods", s.Name)
		}
	}
	for _, p := range gossipSvc.Spec.Ports {
		if p.Port != gossip {
			t.Errorf("gossip Service port %d, --gossip-bind port %d", p.Port, gossip)
		}
	}
}

// TestGatewayExample: the gateway StatefulSet's two containers use flags
// their binaries have, the agent announces the port the gateway listens
// on, and both join gossip through the headless Service.
func TestGatewayExample(t *testing.T) {
	m := loadManifests(t)
	if len(m.statefulSets) != 1 {
		t.Fatalf("%d StatefulSets, want the gateway example", len(m.statefulSets))
	}
	s := m.statefulSets[0]
	pod := s.Spec.Template.Spec
	paths, _ := imagePaths(t)
	gw := container(t, pod, "gateway")
	agent := container(t, pod, "tether-agent")
	for _, c := range []corev1.Container{gw, agent} {
		if len(c.Command) != 1 || !paths[c.Command[0]] {
			t.Errorf("container %s runs %v, not a binary of the image (%v)", c.Name, c.Command, paths)
		}
	}
	ga := args(t, "gateway", gw.Args)
	checkFlags(t, "gateway-stub", ga, flagsOf(t, binary(t, "gateway-stub")))
	aa := args(t, "tether-agent", agent.Args)
	checkFlags(t, "tether-agent", aa, flagsOf(t, binary(t, "tether-agent")))
	svc := namedPort(t, gw, "service", corev1.ProtocolTCP)
	if portOf(t, "--listen", ga["listen"]) != svc || portOf(t, "--service", aa["service"]) != svc {
		t.Errorf("gateway listens on %s, agent announces %s, container port %d", ga["listen"], aa["service"], svc)
	}
	if ga["id"] != aa["id"] || ga["id"] != "$(POD_NAME)" {
		t.Errorf("gateway --id %s, agent --id %s: want both the pod name (stable in a StatefulSet)", ga["id"], aa["id"])
	}
	if !selects(t, s.Spec.Selector, s.Spec.Template.Labels) {
		t.Error("the StatefulSet's selector does not match its pods")
	}
	gossip := portOf(t, "--gossip-bind", aa["gossip-bind"])
	if namedPort(t, agent, "gossip-udp", corev1.ProtocolUDP) != gossip || namedPort(t, agent, "gossip-tcp", corev1.ProtocolTCP) != gossip {
		t.Error("the agent's gossip ports differ from --gossip-bind")
	}
}

// TestSystemdUnit: the unit's ExecStart flags are the proxy's, reload is
// SIGUSR2, PIDFile is --pid-file, and LimitNOFILE fits under the sysctl
// file's fs.nr_open.
func TestSystemdUnit(t *testing.T) {
	raw, err := os.ReadFile("systemd/tether-proxy.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := map[string]string{}
	for _, line := range strings.Split(string(raw), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			unit[k] = v
		}
	}
	fields := strings.Fields(unit["ExecStart"])
	if len(fields) == 0 || fields[0] != "/usr/local/bin/tether-proxy" {
		t.Fatalf("ExecStart %q", unit["ExecStart"])
	}
	known := flagsOf(t, binary(t, "proxy"))
	given := map[string]string{}
	for i := 1; i < len(fields); i += 2 {
		name := strings.TrimPrefix(fields[i], "--")
		if !known[name] || i+1 >= len(fields) {
			t.Fatalf("ExecStart: %q is not a proxy flag with a value", fields[i])
		}
		given[name] = fields[i+1]
	}
	if unit["PIDFile"] != given["pid-file"] || unit["PIDFile"] == "" {
		t.Errorf("PIDFile %q, --pid-file %q", unit["PIDFile"], given["pid-file"])
	}
	if !strings.Contains(unit["ExecReload"], "-USR2") {
		t.Errorf("ExecReload %q does not send SIGUSR2", unit["ExecReload"])
	}
	if unit["KillMode"] != "mixed" {
		t.Errorf("KillMode %q: want mixed (SIGTERM to the main process, the drain)", unit["KillMode"])
	}
	limit, err := strconv.Atoi(unit["LimitNOFILE"])
	if err != nil || limit < 2_000_000 {
		t.Errorf("LimitNOFILE %q: want at least 2,000,000 for a million sessions", unit["LimitNOFILE"])
	}
	sysctl := readSysctl(t)
	if nrOpen, _ := strconv.Atoi(sysctl["fs.nr_open"]); nrOpen < limit {
		t.Errorf("LimitNOFILE %d above fs.nr_open %d: systemd cannot set it", limit, nrOpen)
	}
}

func readSysctl(t *testing.T) map[string]string {
	t.Helper()
	raw, err := os.ReadFile("sysctl.d/90-tether.conf")
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(raw), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || line[0] == '#' {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("sysctl line %q", line)
		}
		out[strings.TrimPrefix(strings.TrimSpace(k), "-")] = strings.TrimSpace(v)
	}
	return out
}

// TestSysctlNames: every setting names a kernel parameter this kernel
// has (or one the file marks optional with "-"), with the arithmetic of
// docs/operating.md for a million sessions.
func TestSysctlNames(t *testing.T) {
	s := readSysctl(t)
	raw, _ := os.ReadFile("sysctl.d/90-tether.conf")
	for k := range s {
		path := "/proc/sys/" + strings.ReplaceAll(k, ".", "/")
		if _, err := os.Stat(path); err != nil && !strings.Contains(string(raw), "-"+k) {
			t.Errorf("%s: no such kernel parameter here (%v)", k, err)
		}
	}
	num := func(k string) int {
		n, err := strconv.Atoi(strings.Fields(s[k])[0])
		if err != nil {
			t.Fatalf("%s = %q", k, s[k])
		}
		return n
	}
	const sessions = 1_000_000
	if num("fs.nr_open") < 2*sessions || num("fs.file-max") < 2*sessions {
		t.Error("descriptors: want at least 2 per session")
	}
	if num("fs.epoll.max_user_watches") < 4*sessions {
		t.Error("epoll watches: want 4 per session (Go's poller and the parker, both sockets)")
	}
}

// TestStaticBuild builds the proxy as the Dockerfile does (CGO_ENABLED=0)
// and checks the result needs no dynamic loader or shared library: it
// runs on a distroless static base.
func TestStaticBuild(t *testing.T) {
	out := filepath.Join(t.TempDir(), "proxy")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/proxy")
	cmd.Dir = ".."
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, b)
	}
	f, err := elf.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Fatal("the static build wants a dynamic loader")
		}
	}
	if libs, _ := f.ImportedLibraries(); len(libs) > 0 {
		t.Fatalf("the static build needs %v", libs)
	}
	v, err := exec.Command(out, "--version").Output()
	if err != nil || !strings.HasPrefix(string(v), "proxy ") {
		t.Fatalf("--version of the static build: %q %v", v, err)
	}
	t.Logf("static build: %s", v)
}

// TestVersions: every binary make build wrote prints its version, the
// commit it was built from and the Go release.
func TestVersions(t *testing.T) {
	rev, err := exec.Command("git", "rev-parse", "--short=12", "HEAD").Output()
	if err != nil {
		t.Fatalf("git rev-parse: %v", err)
	}
	line := regexp.MustCompile(`^(\S+) (v\S+) \(revision ([0-9a-f]{12})(-dirty)?, (go1\S+) (\S+/\S+)\)\n$`)
	for _, name := range []string{"proxy", "gateway-stub", "tether-agent", "tether-client"} {
		out, err := exec.Command(binary(t, name), "--version").Output()
		if err != nil {
			t.Errorf("%s --version: %v", name, err)
			continue
		}
		m := line.FindStringSubmatch(string(out))
		if m == nil || m[1] != name {
			t.Errorf("%s --version printed %q", name, out)
			continue
		}
		if m[3] != strings.TrimSpace(string(rev)) {
			t.Errorf("%s was built from %s, HEAD is %s (make build again)", name, m[3], rev)
		}
	}
}
