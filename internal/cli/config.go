package cli

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Repeatable marks flag values that take a list by repetition (--gateway);
// a YAML list sets such a flag once per item instead of joining the items.
type Repeatable interface {
	flag.Value
	// Reset forgets values set so far (a reload replaces the list).
	Reset()
}

// Reset implements Repeatable.
func (g *GatewayList) Reset() { *g = nil }

// ApplyConfig sets the flags of fs from a YAML file whose keys are the flag
// names without the leading dashes ("listen:", "handshake-timeout:",
// "gateway:" as a list). Flags in skip (set on the command line) are left
// alone: command-line flags win. Lists become comma-separated values, except
// for Repeatable flags, which get one Set per item. Unknown keys, and
// values a flag rejects, are errors naming the key and its line.
func ApplyConfig(fs *flag.FlagSet, path string, skip map[string]bool, notInConfig ...string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config: %w", err)
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil // an empty file sets nothing
		}
		return syntaxError(path, raw, err)
	}
	if len(doc.Content) == 0 {
		return nil
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return fmt.Errorf("config %s line %d: want a mapping of flag names to values", path, root.Line)
	}
	excluded := map[string]bool{"version": true}
	for _, n := range notInConfig {
		excluded[n] = true
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(root.Content); i += 2 {
		k, v := root.Content[i], root.Content[i+1]
		name := k.Value
		f := fs.Lookup(name)
		if f == nil || excluded[name] {
			return fmt.Errorf("config %s line %d: unknown key %q (keys are the flag names without dashes; see --help)", path, k.Line, name)
		}
		if prev, dup := seen[name]; dup {
			return fmt.Errorf("config %s line %d: key %q already set on line %d", path, k.Line, name, prev)
		}
		seen[name] = k.Line
		if skip[name] {
			continue
		}
		values, err := scalarValues(v)
		if err != nil {
			return fmt.Errorf("config %s line %d: %s: %w", path, v.Line, name, err)
		}
		fv := f.Value
		if ev, ok := fv.(*explained); ok {
			fv = ev.Value // the file names keys without dashes
		}
		if rep, ok := fv.(Repeatable); ok {
			rep.Reset()
			for _, s := range values {
				if err := rep.Set(s); err != nil {
					return fmt.Errorf("config %s line %d: %s: %w", path, v.Line, name, err)
				}
			}
			continue
		}
		val := strings.Join(values, ",")
		if err := fv.Set(val); err != nil {
			return fmt.Errorf("config %s line %d: %w", path, v.Line, valueError(name, fv, val, err))
		}
	}
	return nil
}

// yamlLinePrefix is how yaml.v3 starts a syntax error message.
var yamlLinePrefix = regexp.MustCompile(`^yaml: line [0-9]+: `)

// syntaxError names the line a YAML syntax error is on. yaml.v3 reports a
// parser error at the start of the enclosing construct, 0-based (the line
// before it, counted from 1), so its number misleads: the line blamed here
// is the first one after the longest prefix of whole lines that still
// parses. A truncated construct (an open bracket, a quote) only fails until
// it closes, while a syntax error fails every longer prefix, so that line is
// where the file stopped being YAML.
func syntaxError(path string, raw []byte, err error) error {
	msg := yamlLinePrefix.ReplaceAllString(err.Error(), "")
	msg = strings.TrimPrefix(msg, "yaml: ")
	lines := bytes.SplitAfter(raw, []byte("\n"))
	const maxLines = 5000 // config files are short; do not go quadratic on a huge one
	if len(lines) > maxLines {
		return fmt.Errorf("config %s: %w", path, err)
	}
	good := 0
	for k := 1; k < len(lines); k++ {
		var n yaml.Node
		perr := yaml.NewDecoder(bytes.NewReader(bytes.Join(lines[:k], nil))).Decode(&n)
		if perr == nil || errors.Is(perr, io.EOF) {
			good = k
		}
	}
	return fmt.Errorf("config %s line %d: %s (not valid YAML)", path, good+1, msg)
}

func scalarValues(v *yaml.Node) ([]string, error) {
	switch v.Kind {
	case yaml.ScalarNode:
		return []string{v.Value}, nil
	case yaml.SequenceNode:
		out := make([]string, 0, len(v.Content))
		for _, item := range v.Content {
			if item.Kind != yaml.ScalarNode {
				return nil, fmt.Errorf("line %d: list items must be plain values", item.Line)
			}
			out = append(out, item.Value)
		}
		return out, nil
	default:
		return nil, errors.New("want a value or a list of values")
	}
}

// SetOnCommandLine returns the names of the flags given on the command line.
func SetOnCommandLine(fs *flag.FlagSet) map[string]bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return set
}
