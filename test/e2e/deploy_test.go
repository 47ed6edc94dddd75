//go:build e2e

package e2e

import (
	"encoding/json"
	"os"
	"regexp"
	"sort"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"
)

// promqlWords are the PromQL functions, aggregations and keywords the
// deploy kit's queries use: every other identifier in a query is a metric
// name.
var promqlWords = map[string]bool{
	"sum": true, "count": true, "max": true, "min": true, "avg": true, "rate": true, "irate": true, "increase": true,
	"histogram_quantile": true, "absent": true, "and": true, "or": true, "unless": true, "bool": true, "offset": true,
}

var (
	// Label matchers, range selectors and string literals hold no metric
	// names; grouping clauses list labels.
	promqlStrip  = regexp.MustCompile(`\{[^}]*\}|\[[^\]]*\]|"[^"]*"|\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`)
	promqlIdent  = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	labelValues  = regexp.MustCompile(`^label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,\s*[a-zA-Z_]+\s*\)$`)
	templateVars = regexp.MustCompile(`\$\{?[a-zA-Z_]+\}?`)
)

// metricNames are the metric names a PromQL expression reads.
func metricNames(expr string) []string {
	if m := labelValues.FindStringSubmatch(strings.TrimSpace(expr)); m != nil {
		return []string{m[1]}
	}
	expr = templateVars.ReplaceAllString(expr, "")
	expr = promqlStrip.ReplaceAllString(expr, " ")
	var out []string
	for _, id := range promqlIdent.FindAllString(expr, -1) {
		if !promqlWords[id] {
			out = append(out, id)
		}
	}
	return out
}

// TestDeployKitMetricsExist: every metric the alert rules and the Grafana
// dashboard query is one a running proxy exports (Prometheus's own `up`
// aside, in the rules only): a renamed metric cannot leave a silent alert
// or an empty panel behind.
func TestDeployKitMetricsExist(t *testing.T) {
	gw := gatewayStub(t, 1, 0)
	p := proxyFor(t, []*proc{gw})
	exported := map[string]bool{}
	build := ""
	for series := range metrics(t, p) {
		name, _, _ := strings.Cut(series, "{")
		exported[name] = true
		if name == "tether_build_info" {
			build = series
		}
	}
	if !regexp.MustCompile(`^tether_build_info\{goversion="go1[^"]+",revision="[^"]+",version="[^"]+"\}$`).MatchString(build) {
		t.Errorf("tether_build_info is %q, want version, revision and goversion labels", build)
	}

	raw, err := os.ReadFile("../../deploy/prometheus/tether-rules.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var rules struct {
		Groups []struct {
			Rules []struct {
				Alert string `yaml:"alert"`
				Expr  string `yaml:"expr"`
			} `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(raw, &rules); err != nil {
		t.Fatal(err)
	}
	used := map[string][]string{} // metric → where
	n := 0
	for _, g := range rules.Groups {
		for _, r := range g.Rules {
			n++
			for _, name := range metricNames(r.Expr) {
				if name != "up" {
					used[name] = append(used[name], "alert "+r.Alert)
				}
			}
		}
	}
	if n < 10 {
		t.Fatalf("%d alert rules read", n)
	}

	raw, err = os.ReadFile("../../deploy/grafana/tether-proxy.json")
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Name  string `json:"name"`
				Query any    `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(raw, &dash); err != nil {
		t.Fatal(err)
	}
	queries := 0
	for _, pn := range dash.Panels {
		for _, tg := range pn.Targets {
			queries++
			for _, name := range metricNames(tg.Expr) {
				used[name] = append(used[name], "panel "+pn.Title)
			}
		}
	}
	for _, v := range dash.Templating.List {
		if q, ok := v.Query.(map[string]any); ok {
			if s, ok := q["query"].(string); ok {
				for _, name := range metricNames(s) {
					used[name] = append(used[name], "variable "+v.Name)
				}
			}
		}
	}
	if queries < 20 {
		t.Fatalf("%d dashboard queries read", queries)
	}
	var missing []string
	for name, where := range used {
		if !exported[name] {
			missing = append(missing, name+" (used by "+strings.Join(where, ", ")+")")
		}
	}
	sort.Strings(missing)
	for _, m := range missing {
		t.Errorf("not exported by the proxy: %s", m)
	}
	t.Logf("%d alert rules and %d dashboard queries use %d metrics, all exported", n, queries, len(used))
}

// TestMetricNames pins the query parser the test above relies on.
func TestMetricNames(t *testing.T) {
	for expr, want := range map[string]string{
		`sum by (instance, reason) (rate(tether_route_failures_total[5m])) > 0`:                                                           "tether_route_failures_total",
		`histogram_quantile(0.99, sum by (le) (rate(tether_handshake_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))`: "tether_handshake_duration_seconds_bucket",
		`process_open_fds / process_max_fds > 0.8`:                                                                                        "process_open_fds process_max_fds",
		`tether_gossip_encrypted == 0 and tether_cluster_members > 0`:                                                                     "tether_gossip_encrypted tether_cluster_members",
		`label_values(tether_build_info, instance)`:                                                                                       "tether_build_info",
		`up{job="tether"} == 0`: "up",
	} {
		if got := strings.Join(metricNames(expr), " "); got != want {
			t.Errorf("metricNames(%q) = %q, want %q", expr, got, want)
		}
	}
}
