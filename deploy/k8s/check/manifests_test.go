// Package check validates deploy/k8s without a cluster: each kustomization is rendered
// in-process (sigs.k8s.io/kustomize/api, what `kubectl kustomize` runs), every object is
// decoded strictly (an unknown or misspelt field is an error) into its k8s.io/api type, and the
// result is held against the binary it deploys:
//
//   - USER_SERVICE_BIN: the binary (scripts/check-image passes the one inside the image); its
//     --help gives the settings it knows, their defaults and their possible values, so a
//     ConfigMap key it does not read, a value it would refuse, or a containerPort that is not
//     its default listen port fails here;
//   - USER_SERVICE_ADDR: a running instance; every health name a probe asks for is checked
//     with grpc.health.v1 Check and must be SERVING;
//   - USER_SERVICE_PEAK_RSS_BYTES: the peak RSS measured under load; the memory request must
//     cover it.
//
// Without them those tests skip, unless CHECK_REQUIRE_LIVE=1 (as scripts/check-image sets).
package check

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// The kustomizations a user applies.
var kustomizations = []string{"base", "overlays/dev", "overlays/production"}

// Settings the service reads that are not clap flags (so not in --help).
var extraEnv = map[string]bool{"RUST_LOG": true}

const containerName = "user-service"

// rendered is one kustomization's output, decoded.
type rendered struct {
	dir         string
	deployments []*appsv1.Deployment
	services    []*corev1.Service
	configMaps  map[string]*corev1.ConfigMap
	secrets     map[string]*corev1.Secret
	pdbs        []*policyv1.PodDisruptionBudget
	accounts    map[string]*corev1.ServiceAccount
	rules       []*monitoringv1.PrometheusRule
}

// newObject: the k8s.io/api type of each kind the manifests may hold; any other kind fails.
func newObject(apiVersion, kind string) (any, bool) {
	switch apiVersion + "/" + kind {
	case "apps/v1/Deployment":
		return &appsv1.Deployment{}, true
	case "v1/Service":
		return &corev1.Service{}, true
	case "v1/ConfigMap":
		return &corev1.ConfigMap{}, true
	case "v1/Secret":
		return &corev1.Secret{}, true
	case "v1/ServiceAccount":
		return &corev1.ServiceAccount{}, true
	case "policy/v1/PodDisruptionBudget":
		return &policyv1.PodDisruptionBudget{}, true
	case "monitoring.coreos.com/v1/PrometheusRule":
		return &monitoringv1.PrometheusRule{}, true
	}
	return nil, false
}

func render(t *testing.T, dir string) *rendered {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	m, err := k.Run(filesys.MakeFsOnDisk(), filepath.Join("..", dir))
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	r := &rendered{
		dir:        dir,
		configMaps: map[string]*corev1.ConfigMap{},
		secrets:    map[string]*corev1.Secret{},
		accounts:   map[string]*corev1.ServiceAccount{},
	}
	seen := map[string]bool{}
	for _, res := range m.Resources() {
		data, err := res.AsYAML()
		if err != nil {
			t.Fatalf("%s: %s as YAML: %v", dir, res.CurId(), err)
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(data, &tm); err != nil {
			t.Fatalf("%s: %s: %v", dir, res.CurId(), err)
		}
		obj, ok := newObject(tm.APIVersion, tm.Kind)
		if !ok {
			t.Errorf("%s: %s %s: a kind this check does not know; add its k8s.io/api type", dir, tm.APIVersion, tm.Kind)
			continue
		}
		// Strict: unknown fields and duplicate keys are errors, as `kubectl apply
		// --validate=strict` makes them.
		if err := yaml.UnmarshalStrict(data, obj); err != nil {
			t.Errorf("%s: %s %s does not decode strictly into %T: %v", dir, tm.Kind, res.GetName(), obj, err)
			continue
		}
		key := tm.Kind + "/" + res.GetNamespace() + "/" + res.GetName()
		if seen[key] {
			t.Errorf("%s: %s twice", dir, key)
		}
		seen[key] = true
		switch o := obj.(type) {
		case *appsv1.Deployment:
			r.deployments = append(r.deployments, o)
		case *corev1.Service:
			r.services = append(r.services, o)
		case *corev1.ConfigMap:
			r.configMaps[o.Name] = o
		case *corev1.Secret:
			r.secrets[o.Name] = o
		case *corev1.ServiceAccount:
			r.accounts[o.Name] = o
		case *policyv1.PodDisruptionBudget:
			r.pdbs = append(r.pdbs, o)
		case *monitoringv1.PrometheusRule:
			r.rules = append(r.rules, o)
		}
		for _, msg := range validation.IsDNS1123Subdomain(res.GetName()) {
			t.Errorf("%s: %s name %q: %s", dir, tm.Kind, res.GetName(), msg)
		}
	}
	return r
}

var (
	renderOnce sync.Once
	renders    map[string]*rendered
)

func all(t *testing.T) map[string]*rendered {
	renderOnce.Do(func() {
		renders = map[string]*rendered{}
		for _, d := range kustomizations {
			renders[d] = render(t, d)
		}
	})
	return renders
}

// deployment: the one Deployment of a render, and its service container.
func deployment(t *testing.T, r *rendered) (*appsv1.Deployment, *corev1.Container) {
	t.Helper()
	if r == nil {
		t.Fatalf("the kustomization did not render (see the first test's errors)")
	}
	if len(r.deployments) != 1 {
		t.Fatalf("%s: %d Deployments, want 1", r.dir, len(r.deployments))
	}
	d := r.deployments[0]
	for i := range d.Spec.Template.Spec.Containers {
		if c := &d.Spec.Template.Spec.Containers[i]; c.Name == containerName {
			return d, c
		}
	}
	t.Fatalf("%s: no container %q", r.dir, containerName)
	return nil, nil
}

func containerPort(t *testing.T, c *corev1.Container, name string) int32 {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, name)
	return 0
}

// env: the container's environment as the kubelet builds it from envFrom ConfigMaps and env
// (only literal values; this service takes none from fieldRefs).
func env(t *testing.T, r *rendered, c *corev1.Container) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, src := range c.EnvFrom {
		if src.SecretRef != nil {
			t.Errorf("%s: envFrom a Secret: secrets are mounted as files (*_FILE settings), not put in the environment", r.dir)
		}
		if src.ConfigMapRef == nil {
			continue
		}
		cm, ok := r.configMaps[src.ConfigMapRef.Name]
		if !ok {
			t.Errorf("%s: envFrom names ConfigMap %q, which the kustomization does not render", r.dir, src.ConfigMapRef.Name)
			continue
		}
		for k, v := range cm.Data {
			out[k] = v
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom != nil {
			continue
		}
		out[e.Name] = e.Value
	}
	return out
}

// ---- what the binary says about itself ----

type setting struct {
	def      string   // default, "" when none
	possible []string // possible values, when an enum
}

var (
	helpOnce sync.Once
	help     map[string]*setting
	helpErr  error
)

func requireLive() bool { return os.Getenv("CHECK_REQUIRE_LIVE") == "1" }

func skipOrFail(t *testing.T, format string, args ...any) {
	t.Helper()
	if requireLive() {
		t.Fatalf(format+" (CHECK_REQUIRE_LIVE=1)", args...)
	}
	t.Skipf(format, args...)
}

var (
	reEnv      = regexp.MustCompile(`\[env: ([A-Z0-9_]+)=`)
	reDefault  = regexp.MustCompile(`\[default: ([^\]]*)\]`)
	rePossible = regexp.MustCompile(`\[possible values: ([^\]]*)\]`)
	reOption   = regexp.MustCompile(`^\s{2,6}(-\w, )?--[a-z0-9-]+`)
	reListItem = regexp.MustCompile(`^\s+- ([^:\s]+)(:|$)`)
)

// binarySettings parses `user-service --help`: per environment variable, its default and
// its possible values.
func binarySettings(t *testing.T) map[string]*setting {
	t.Helper()
	bin := os.Getenv("USER_SERVICE_BIN")
	if bin == "" {
		skipOrFail(t, "USER_SERVICE_BIN is not set: no binary to hold the manifests against")
	}
	helpOnce.Do(func() {
		// An empty environment: clap shows the environment's values in place of the
		// defaults, and the defaults are what is wanted here.
		cmd := exec.Command(bin, "--help")
		cmd.Env = []string{}
		out, err := cmd.Output()
		if err != nil {
			helpErr = fmt.Errorf("%s --help: %w", bin, err)
			return
		}
		help = parseHelp(string(out))
		if len(help) < 10 {
			helpErr = fmt.Errorf("%s --help: only %d settings found; has the help format changed?", bin, len(help))
			return
		}
		// The parser's own check: two enums, one in each of clap's formats.
		for _, k := range []string{"LOG_FORMAT", "REDIS_CLIENT"} {
			if s, ok := help[k]; !ok || len(s.possible) < 2 {
				helpErr = fmt.Errorf("%s --help: no possible values read for %s; has the help format changed?", bin, k)
				return
			}
		}
	})
	if helpErr != nil {
		t.Fatal(helpErr)
	}
	return help
}

func parseHelp(text string) map[string]*setting {
	settings := map[string]*setting{}
	// One block per option: from its "--flag" line to the next.
	var blocks [][]string
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		if reOption.MatchString(line) {
			blocks = append(blocks, nil)
		}
		if len(blocks) > 0 {
			blocks[len(blocks)-1] = append(blocks[len(blocks)-1], line)
		}
	}
	for _, b := range blocks {
		joined := strings.Join(b, "\n")
		m := reEnv.FindStringSubmatch(joined)
		if m == nil {
			continue
		}
		s := &setting{}
		if d := reDefault.FindStringSubmatch(joined); d != nil {
			s.def = d[1]
		}
		if p := rePossible.FindStringSubmatch(joined); p != nil {
			for _, v := range strings.Split(p[1], ",") {
				s.possible = append(s.possible, strings.TrimSpace(v))
			}
		}
		// Long help lists an enum's values one per line ("- name: what it means").
		inList := false
		for _, line := range b {
			if strings.TrimSpace(line) == "Possible values:" {
				inList = true
				continue
			}
			if inList {
				if li := reListItem.FindStringSubmatch(line); li != nil {
					s.possible = append(s.possible, li[1])
					continue
				}
				if strings.TrimSpace(line) == "" {
					continue
				}
				inList = false
			}
		}
		settings[m[1]] = s
	}
	return settings
}

func portOf(t *testing.T, name, addr string) int32 {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s=%q: port: %v", name, addr, err)
	}
	return int32(n)
}

// value: a setting as the container would see it, else the binary's default.
func value(t *testing.T, bin map[string]*setting, e map[string]string, name string) string {
	t.Helper()
	if v, ok := e[name]; ok {
		return v
	}
	s, ok := bin[name]
	if !ok || s.def == "" {
		t.Fatalf("%s: neither set nor a default in --help", name)
	}
	return s.def
}

// ---- the tests ----

// TestRenderStrict renders every kustomization and decodes every object strictly (render does
// it); the objects reference each other consistently.
func TestRenderStrict(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			r := all(t)[dir]
			d, c := deployment(t, r)
			spec := d.Spec.Template.Spec
			sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
			if err != nil {
				t.Fatalf("selector: %v", err)
			}
			podLabels := labels.Set(d.Spec.Template.Labels)
			if !sel.Matches(podLabels) {
				t.Errorf("the Deployment's selector %s does not match its pods' labels %v", sel, podLabels)
			}
			if len(r.services) == 0 {
				t.Errorf("no Service")
			}
			for _, s := range r.services {
				if !labels.SelectorFromSet(s.Spec.Selector).Matches(podLabels) {
					t.Errorf("Service %s selects %v, not the pods %v", s.Name, s.Spec.Selector, podLabels)
				}
				for _, p := range s.Spec.Ports {
					if p.TargetPort.StrVal != "" {
						containerPort(t, c, p.TargetPort.StrVal)
					}
				}
			}
			if len(r.pdbs) != 1 {
				t.Fatalf("%d PodDisruptionBudgets, want 1", len(r.pdbs))
			}
			pdb := r.pdbs[0]
			psel, err := metav1.LabelSelectorAsSelector(pdb.Spec.Selector)
			if err != nil || !psel.Matches(podLabels) {
				t.Errorf("the PodDisruptionBudget's selector %v does not match the pods (%v)", pdb.Spec.Selector, err)
			}
			replicas := int32(1)
			if d.Spec.Replicas != nil {
				replicas = *d.Spec.Replicas
			}
			if pdb.Spec.MaxUnavailable == nil || pdb.Spec.MaxUnavailable.IntValue() < 1 {
				t.Errorf("the PodDisruptionBudget must let one pod go (maxUnavailable >= 1), or a %d-replica deployment blocks node drains", replicas)
			}
			if sa := spec.ServiceAccountName; sa != "" {
				if _, ok := r.accounts[sa]; !ok {
					t.Errorf("serviceAccountName %q is not rendered", sa)
				}
			}
			for _, v := range spec.Volumes {
				if v.Secret == nil {
					continue
				}
				if _, ok := r.secrets[v.Secret.SecretName]; !ok {
					t.Logf("Secret %q is not rendered here: it must exist in the namespace (see the kustomization's comment)", v.Secret.SecretName)
				}
			}
			for _, m := range c.VolumeMounts {
				if !slices.ContainsFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == m.Name }) {
					t.Errorf("volumeMount %q names no volume", m.Name)
				}
			}
			if r.dir != "base" && c.Image == "user-service" {
				t.Errorf("overlay %s does not set the image (kustomize images:)", r.dir)
			}
		})
	}
}

// TestPrometheusRuleIsTheRulesFile: every render holds one PrometheusRule (the Prometheus
// Operator's type, decoded strictly above), and its spec is deploy/prometheus/rules.yml, the file
// `promtool test rules` tests and scripts/check-operations loads, decoded strictly into the same
// type: the two cannot drift apart.
func TestPrometheusRuleIsTheRulesFile(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("..", "..", "prometheus", "rules.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var want monitoringv1.PrometheusRuleSpec
	if err := yaml.UnmarshalStrict(data, &want); err != nil {
		t.Fatalf("deploy/prometheus/rules.yml does not decode strictly as a PrometheusRule's spec: %v", err)
	}
	if len(want.Groups) == 0 || len(want.Groups[0].Rules) == 0 {
		t.Fatalf("deploy/prometheus/rules.yml has no rules")
	}
	for _, dir := range kustomizations {
		r := all(t)[dir]
		if len(r.rules) != 1 {
			t.Errorf("%s: %d PrometheusRules, want 1", dir, len(r.rules))
			continue
		}
		if got := r.rules[0].Spec; !reflect.DeepEqual(got, want) {
			gotYAML, _ := yaml.Marshal(got)
			wantYAML, _ := yaml.Marshal(want)
			t.Errorf("%s: the PrometheusRule's spec is not deploy/prometheus/rules.yml (write it again: see the comment atop deploy/k8s/base/prometheusrule.yaml); first difference:\n%s", dir, firstDifference(string(gotYAML), string(wantYAML)))
		}
		for _, g := range r.rules[0].Spec.Groups {
			for _, rule := range g.Rules {
				if rule.For == nil || rule.Labels["severity"] == "" || rule.Annotations["runbook_url"] == "" {
					t.Errorf("%s: alert %s lacks a for:, a severity label or a runbook_url", dir, rule.Alert)
				}
			}
		}
	}
}

// firstDifference: the first line where got and want differ, with its number.
func firstDifference(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return fmt.Sprintf("line %d\n got: %s\nwant: %s", i+1, gl, wl)
		}
	}
	return "(none in the YAML)"
}

// TestSecurityContext: non-root 65534, read-only root, no privilege escalation, no
// capabilities, the runtime's seccomp profile, no API token.
func TestSecurityContext(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			d, c := deployment(t, all(t)[dir])
			ps := d.Spec.Template.Spec.SecurityContext
			cs := c.SecurityContext
			if ps == nil || cs == nil {
				t.Fatalf("pod or container securityContext missing")
			}
			isTrue := func(b *bool) bool { return b != nil && *b }
			isFalse := func(b *bool) bool { return b != nil && !*b }
			if !isTrue(cs.RunAsNonRoot) || !isTrue(ps.RunAsNonRoot) {
				t.Errorf("runAsNonRoot must be true (pod and container)")
			}
			for what, u := range map[string]*int64{"pod runAsUser": ps.RunAsUser, "container runAsUser": cs.RunAsUser} {
				if u == nil || *u != 65534 {
					t.Errorf("%s must be 65534 (the image's USER)", what)
				}
			}
			if !isTrue(cs.ReadOnlyRootFilesystem) {
				t.Errorf("readOnlyRootFilesystem must be true")
			}
			if !isFalse(cs.AllowPrivilegeEscalation) {
				t.Errorf("allowPrivilegeEscalation must be false")
			}
			if isTrue(cs.Privileged) {
				t.Errorf("privileged")
			}
			if cs.Capabilities == nil || !slices.Equal(cs.Capabilities.Drop, []corev1.Capability{"ALL"}) || len(cs.Capabilities.Add) > 0 {
				t.Errorf("capabilities must drop ALL and add none: %+v", cs.Capabilities)
			}
			for what, sp := range map[string]*corev1.SeccompProfile{"pod": ps.SeccompProfile, "container": cs.SeccompProfile} {
				if sp == nil || sp.Type != corev1.SeccompProfileTypeRuntimeDefault {
					t.Errorf("%s seccompProfile must be RuntimeDefault", what)
				}
			}
			if !isFalse(d.Spec.Template.Spec.AutomountServiceAccountToken) {
				t.Errorf("automountServiceAccountToken must be false (the service calls no Kubernetes API)")
			}
			if !isFalse(d.Spec.Template.Spec.EnableServiceLinks) {
				t.Errorf("enableServiceLinks must be false (a Service named kafka would set KAFKA_PORT=tcp://...)")
			}
		})
	}
}

// TestServiceAndMetrics: the gRPC port is declared as gRPC for meshes, the metrics port has
// its scrape annotations, and both name the container's ports.
func TestServiceAndMetrics(t *testing.T) {
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			r := all(t)[dir]
			_, c := deployment(t, r)
			grpcPort := containerPort(t, c, "grpc")
			metricsPort := containerPort(t, c, "metrics")
			var main *corev1.Service
			for _, s := range r.services {
				if s.Name == "user-service" {
					main = s
				}
				for _, p := range s.Spec.Ports {
					if p.TargetPort.StrVal == "grpc" || p.TargetPort.IntValue() == int(grpcPort) {
						if p.AppProtocol == nil || *p.AppProtocol != "grpc" {
							t.Errorf("Service %s port %s reaches the gRPC port without appProtocol: grpc", s.Name, p.Name)
						}
					}
				}
			}
			if main == nil {
				t.Fatalf("no Service user-service")
			}
			var hasMetrics bool
			for _, p := range main.Spec.Ports {
				if p.TargetPort.StrVal == "metrics" || p.TargetPort.IntValue() == int(metricsPort) {
					hasMetrics = true
				}
			}
			if !hasMetrics {
				t.Errorf("Service user-service has no port for metrics")
			}
			a := main.Annotations
			if a["prometheus.io/scrape"] != "true" || a["prometheus.io/path"] != "/metrics" ||
				a["prometheus.io/port"] != strconv.Itoa(int(metricsPort)) {
				t.Errorf("scrape annotations %v do not name port %d and /metrics", a, metricsPort)
			}
		})
	}
}

// TestSettingsMatchBinary: every ConfigMap key is a setting the binary reads, every enum value
// one it accepts, every duration one it parses; no password sits in a ConfigMap; the ports are
// the binary's defaults and what LISTEN_ADDR / METRICS_ADDR say; *_FILE settings point into a
// mounted Secret the service's user can read.
func TestSettingsMatchBinary(t *testing.T) {
	bin := binarySettings(t)
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			r := all(t)[dir]
			d, c := deployment(t, r)
			e := env(t, r, c)
			keys := make([]string, 0, len(e))
			for k := range e {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				v := e[k]
				s, known := bin[k]
				if !known && !extraEnv[k] {
					t.Errorf("%s is not a setting of the binary (not in --help)", k)
					continue
				}
				if strings.HasSuffix(k, "_PASSWORD") {
					t.Errorf("%s in a ConfigMap: a password belongs in the Secret, read through %s_FILE", k, k)
				}
				if known && len(s.possible) > 0 && !slices.ContainsFunc(s.possible, func(p string) bool { return strings.EqualFold(p, v) }) {
					t.Errorf("%s=%s: the binary accepts only %v", k, v, s.possible)
				}
				if known && s.def != "" && isDuration(s.def) {
					if _, err := time.ParseDuration(v); err != nil {
						t.Errorf("%s=%s: not a duration (%v)", k, v, err)
					}
				}
			}

			// Ports: the binary's defaults, and what the settings make it listen on.
			grpcPort := containerPort(t, c, "grpc")
			metricsPort := containerPort(t, c, "metrics")
			if want := portOf(t, "default LISTEN_ADDR", bin["LISTEN_ADDR"].def); grpcPort != want {
				t.Errorf("containerPort grpc %d, the binary's default LISTEN_ADDR port is %d", grpcPort, want)
			}
			if want := portOf(t, "default METRICS_ADDR", bin["METRICS_ADDR"].def); metricsPort != want {
				t.Errorf("containerPort metrics %d, the binary's default METRICS_ADDR port is %d", metricsPort, want)
			}
			if got := portOf(t, "LISTEN_ADDR", value(t, bin, e, "LISTEN_ADDR")); got != grpcPort {
				t.Errorf("LISTEN_ADDR listens on %d, containerPort grpc is %d", got, grpcPort)
			}
			if got := portOf(t, "METRICS_ADDR", value(t, bin, e, "METRICS_ADDR")); got != metricsPort {
				t.Errorf("METRICS_ADDR listens on %d, containerPort metrics is %d", got, metricsPort)
			}
			for _, p := range []*corev1.Probe{c.ReadinessProbe, c.LivenessProbe, c.StartupProbe} {
				if p != nil && p.GRPC != nil && p.GRPC.Port != grpcPort {
					t.Errorf("a gRPC probe asks port %d, the gRPC port is %d", p.GRPC.Port, grpcPort)
				}
			}

			// Secrets as files, readable by the service's user and nobody else.
			spec := d.Spec.Template.Spec
			for _, k := range keys {
				if !strings.HasSuffix(k, "_FILE") {
					continue
				}
				path := e[k]
				mount, vol := mountFor(c, spec.Volumes, path)
				if vol == nil || vol.Secret == nil {
					t.Errorf("%s=%s is not in a mounted Secret", k, path)
					continue
				}
				if !mount.ReadOnly {
					t.Errorf("the Secret volume %s is mounted read-write", mount.Name)
				}
				key := strings.TrimPrefix(strings.TrimPrefix(path, mount.MountPath), "/")
				if sec, ok := r.secrets[vol.Secret.SecretName]; ok {
					_, inData := sec.Data[key]
					_, inString := sec.StringData[key]
					if !inData && !inString {
						t.Errorf("%s=%s: Secret %s has no key %q", k, path, sec.Name, key)
					}
				} else {
					t.Logf("%s reads key %q of Secret %s, created outside the kustomization", k, key, vol.Secret.SecretName)
				}
				mode := int32(0o644) // the kubelet's default
				if vol.Secret.DefaultMode != nil {
					mode = *vol.Secret.DefaultMode
				}
				group := spec.SecurityContext.FSGroup
				readable := mode&0o004 != 0 || (mode&0o040 != 0 && group != nil && *group == 65534)
				if !readable {
					t.Errorf("the Secret's files (mode %#o, fsGroup %v) are not readable by user 65534", mode, group)
				}
				if mode&0o007 != 0 {
					t.Errorf("the Secret's files (mode %#o) are readable by every user of the node", mode)
				}
			}
		})
	}
}

// TestDrainTiming: the kubelet's SIGKILL comes after the whole drain: preStop sleep, then
// SIGTERM, NOT_SERVING for DRAIN_GRACE, then at most SHUTDOWN_TIMEOUT to finish.
func TestDrainTiming(t *testing.T) {
	bin := binarySettings(t)
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			r := all(t)[dir]
			d, c := deployment(t, r)
			e := env(t, r, c)
			grace := dur(t, "DRAIN_GRACE", value(t, bin, e, "DRAIN_GRACE"))
			timeout := dur(t, "SHUTDOWN_TIMEOUT", value(t, bin, e, "SHUTDOWN_TIMEOUT"))
			if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
				t.Fatalf("no preStop")
			}
			ps := c.Lifecycle.PreStop
			if ps.Exec != nil {
				t.Errorf("preStop exec: the image has no shell nor sleep; use the sleep action")
			}
			if ps.Sleep == nil {
				t.Fatalf("preStop is not a sleep")
			}
			preStop := time.Duration(ps.Sleep.Seconds) * time.Second
			if preStop <= 0 {
				t.Errorf("preStop sleeps %v", preStop)
			}
			tgp := d.Spec.Template.Spec.TerminationGracePeriodSeconds
			if tgp == nil {
				t.Fatalf("terminationGracePeriodSeconds unset (30 s by default)")
			}
			need := preStop + grace + timeout + 2*time.Second
			if got := time.Duration(*tgp) * time.Second; got < need {
				t.Errorf("terminationGracePeriodSeconds %v < preStop %v + DRAIN_GRACE %v + SHUTDOWN_TIMEOUT %v + 2 s", got, preStop, grace, timeout)
			}
			t.Logf("drain: preStop %v + DRAIN_GRACE %v + SHUTDOWN_TIMEOUT %v <= %ds before SIGKILL", preStop, grace, timeout, *tgp)
			// A readiness probe must see NOT_SERVING within the grace, while the pod still serves.
			if rp := c.ReadinessProbe; rp != nil {
				seen := time.Duration(rp.PeriodSeconds*rp.FailureThreshold) * time.Second
				if seen > preStop+grace {
					t.Errorf("readiness notices a drain after %v, longer than preStop + DRAIN_GRACE %v", seen, preStop+grace)
				}
			}
		})
	}
}

// TestResources: requests and limits for CPU and memory; the memory request covers the peak
// RSS measured under load (scripts/check-image), the limit leaves room above it.
func TestResources(t *testing.T) {
	var peak int64
	if s := os.Getenv("USER_SERVICE_PEAK_RSS_BYTES"); s != "" {
		var err error
		if peak, err = strconv.ParseInt(s, 10, 64); err != nil {
			t.Fatalf("USER_SERVICE_PEAK_RSS_BYTES=%q: %v", s, err)
		}
	}
	for _, dir := range kustomizations {
		t.Run(dir, func(t *testing.T) {
			_, c := deployment(t, all(t)[dir])
			req, lim := c.Resources.Requests, c.Resources.Limits
			for _, n := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
				rq, okr := req[n]
				l, okl := lim[n]
				if !okr || !okl {
					t.Errorf("%s: request and limit both needed", n)
					continue
				}
				if rq.Cmp(l) > 0 {
					t.Errorf("%s request %s above its limit %s", n, rq.String(), l.String())
				}
			}
			if peak > 0 {
				mem := req[corev1.ResourceMemory]
				if mem.Cmp(*resource.NewQuantity(peak, resource.BinarySI)) < 0 {
					t.Errorf("memory request %s is below the peak RSS measured under load (%d MiB)", mem.String(), peak>>20)
				}
				ml := lim[corev1.ResourceMemory]
				if ml.Value() < 2*peak {
					t.Errorf("memory limit %s leaves less than twice the measured peak (%d MiB)", ml.String(), peak>>20)
				}
				t.Logf("memory: request %s, limit %s, measured peak RSS %.1f MiB", mem.String(), ml.String(), float64(peak)/(1<<20))
			} else if requireLive() {
				t.Errorf("USER_SERVICE_PEAK_RSS_BYTES not set (CHECK_REQUIRE_LIVE=1)")
			}
		})
	}
}

// TestProbesAgainstLiveService: every health name a probe asks for is served, SERVING, by a
// running instance of the binary; an unknown name is not (so the check can fail).
func TestProbesAgainstLiveService(t *testing.T) {
	addr := os.Getenv("USER_SERVICE_ADDR")
	if addr == "" {
		skipOrFail(t, "USER_SERVICE_ADDR is not set: no live service to ask")
	}
	names := map[string][]string{} // health name → where it is used
	for _, dir := range kustomizations {
		_, c := deployment(t, all(t)[dir])
		for what, p := range map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe, "startup": c.StartupProbe} {
			if p == nil {
				if what != "startup" {
					t.Errorf("%s: no %s probe", dir, what)
				}
				continue
			}
			if p.GRPC == nil {
				t.Errorf("%s: the %s probe is not a native gRPC probe", dir, what)
				continue
			}
			name := ""
			if p.GRPC.Service != nil {
				name = *p.GRPC.Service
			}
			names[name] = append(names[name], dir+" "+what)
		}
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	defer conn.Close()
	health := healthpb.NewHealthClient(conn)
	check := func(name string) (healthpb.HealthCheckResponse_ServingStatus, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := health.Check(ctx, &healthpb.HealthCheckRequest{Service: name})
		if err != nil {
			return healthpb.HealthCheckResponse_UNKNOWN, err
		}
		return resp.Status, nil
	}
	for name, uses := range names {
		st, err := check(name)
		if err != nil || st != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health %q (%s): %v %v, want SERVING", name, strings.Join(uses, ", "), st, err)
			continue
		}
		t.Logf("health %q SERVING at %s (%s)", name, addr, strings.Join(uses, ", "))
	}
	if _, err := check("no.such.Service"); status.Code(err) != codes.NotFound {
		t.Errorf("an unknown health name answered %v, want NotFound: the check above could not fail", err)
	}
}

func isDuration(s string) bool {
	_, err := time.ParseDuration(s)
	return err == nil
}

func dur(t *testing.T, name, s string) time.Duration {
	t.Helper()
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, s, err)
	}
	return d
}

// mountFor: the volume mount (and its volume) that holds path.
func mountFor(c *corev1.Container, vols []corev1.Volume, path string) (*corev1.VolumeMount, *corev1.Volume) {
	var best *corev1.VolumeMount
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		if strings.HasPrefix(path, strings.TrimSuffix(m.MountPath, "/")+"/") && (best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = m
		}
	}
	if best == nil {
		return nil, nil
	}
	for i := range vols {
		if vols[i].Name == best.Name {
			return best, &vols[i]
		}
	}
	return best, nil
}
