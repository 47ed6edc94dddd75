package cli

import "testing"

func TestParseGateway(t *testing.T) {
	tests := []struct {
		in      string
		id      string
		addr    string
		weight  float64
		wantErr bool
	}{
		{in: "gw-1=127.0.1.1:9000", id: "gw-1", addr: "127.0.1.1:9000", weight: 1},
		{in: "gw-2=[::1]:9000,weight=2.5", id: "gw-2", addr: "[::1]:9000", weight: 2.5},
		{in: "gw-3=h:1,weight=0", id: "gw-3", addr: "h:1", weight: 0},
		{in: "=h:1", wantErr: true},
		{in: "gw", wantErr: true},
		{in: "gw=nohost", wantErr: true},
		{in: "gw=h:1,weight=-1", wantErr: true},
		{in: "gw=h:1,weight=x", wantErr: true},
		{in: "gw=h:1,color=red", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			m, err := ParseGateway(tt.in)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v", err)
			}
			if err == nil && (m.ID != tt.id || m.Addr != tt.addr || m.Weight != tt.weight) {
				t.Fatalf("got %+v", m)
			}
		})
	}
}

func TestNewLogger(t *testing.T) {
	for _, f := range []string{"json", "console"} {
		if _, err := NewLogger("debug", f); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := NewLogger("loud", "json"); err == nil {
		t.Fatal("bad level accepted")
	}
	if _, err := NewLogger("info", "xml"); err == nil {
		t.Fatal("bad format accepted")
	}
}
