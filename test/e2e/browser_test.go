//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/tether-proxy/tether/internal/testenv"
)

// TestBrowserWebSocket: headless Chromium loads the gateway stub's page
// through two proxies (the page request and its WebSockets carry the key in
// the query string), the page's WebSocket reports its gateway, the page
// closes it and reconnects, and both connections report the same gateway.
// A screenshot is saved under test/e2e/artifacts/.
func TestBrowserWebSocket(t *testing.T) {
	chromium := testenv.Need(t, "chromium")
	gws := []*proc{gatewayStub(t, 1, 0), gatewayStub(t, 2, 0), gatewayStub(t, 3, 0)}
	p := proxyFor(t, gws, "--key-from", "cookie:sid,query:sid")

	log := browse(t, chromium, "http://"+p.addr+"/?sid=browser-key-1", "browser-websocket.png")
	gw, conns := sameGatewayTwice(t, log, "browser-key-1")
	t.Logf("browser: both WebSocket connections on gateway %s (conns %s)", gw, conns)
}

// sameGatewayTwice checks the stub page's log: two WebSocket connections
// with key, on one gateway, the second counted as its second connection.
func sameGatewayTwice(t *testing.T, log, key string) (gateway, conns string) {
	t.Helper()
	m := regexp.MustCompile(`connection (\d): gateway (\S+) key (\S+) conns (\d+)`).FindAllStringSubmatch(log, -1)
	if len(m) != 2 {
		t.Fatalf("page log %q: want two connections", log)
	}
	if m[0][2] != m[1][2] || m[0][3] != key || m[1][4] != "2" {
		t.Fatalf("the page's two WebSockets: %q / %q", m[0][0], m[1][0])
	}
	return m[0][2], m[0][4] + " then " + m[1][4]
}

// browse loads url in headless Chromium (with extra command-line flags),
// waits for the stub page's log to say done, saves a screenshot under
// test/e2e/artifacts/ as shot, and returns the log.
func browse(t *testing.T, chromium, url, shot string, flags ...chromedp.ExecAllocatorOption) string {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
		chromedp.NoSandbox, // tests run as root in CI
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("no-first-run", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
	)
	opts = append(opts, flags...)
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(actx)
	defer cancel()
	ctx, cancelT := context.WithTimeout(ctx, 60*time.Second)
	defer cancelT()
	err := chromedp.Do(ctx,
		chromedp.Navigate(url),
		chromedp.WaitVisible("#log"),
	)
	var log string
	if err == nil {
		_, err = chromedp.Run(ctx, chromedp.Poll[bool](`document.getElementById("log").textContent.includes("done")`,
			chromedp.WithPollingTimeout(30*time.Second)))
	}
	if err == nil {
		log, err = chromedp.Run(ctx, chromedp.Text("#log"))
	}
	var png []byte
	if err == nil {
		png, err = chromedp.Run(ctx, chromedp.FullScreenshot(100)) // quality 100: PNG
	}
	if err != nil {
		t.Fatalf("browser: %v (page log so far: %q)", err, log)
	}
	dir := filepath.Join("artifacts")
	if err := os.MkdirAll(dir, 0o755); err == nil {
		path := filepath.Join(dir, shot)
		if err := os.WriteFile(path, png, 0o644); err == nil {
			t.Logf("screenshot: test/e2e/%s", path)
		}
	}
	return log
}
