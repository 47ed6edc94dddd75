package stub

import (
	"bytes"
	"os"
	"testing"
)

// TestTetherJSIsTheClientLibrary: the page's script is clients/js/tether.js
// as it is (after changing it, copy it here: cp clients/js/tether.js
// internal/stub/).
func TestTetherJSIsTheClientLibrary(t *testing.T) {
	lib, err := os.ReadFile("../../clients/js/tether.js")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(lib, tetherJS) {
		t.Fatal("internal/stub/tether.js differs from clients/js/tether.js: cp clients/js/tether.js internal/stub/")
	}
}
