package config

import (
	"sort"
	"strconv"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// positions maps every key path of a TOML document to the line it is
// defined on, so that errors found after decoding (a bad value, an unknown
// key) can name their line. Paths are the keys joined with ".", with
// "[i]" after each element of an array of tables or of an array value:
// "quorum.m", "fencing.level[0].agent[1].path", "gossip.seeds[2]".
type positions struct {
	lines map[string]int
}

// line returns the line of path, or of its closest enclosing key that has
// one (0 if none does: the error is then about the whole file).
func (p *positions) line(path string) int {
	for path != "" {
		if l, ok := p.lines[path]; ok {
			return l
		}
		path = parentPath(path)
	}
	return 0
}

// parentPath strips the last segment (".key" or "[i]") of a path.
func parentPath(path string) string {
	i := strings.LastIndexAny(path, ".[")
	if i < 0 {
		return ""
	}
	return path[:i]
}

// indexPositions walks the document's syntax tree. The document has
// already been decoded successfully, so its structure is valid TOML; a
// parse error here (impossible then) just leaves positions out.
func indexPositions(data []byte) *positions {
	pos := &positions{lines: map[string]int{}}
	starts := []int{0}
	for i, c := range data {
		if c == '\n' {
			starts = append(starts, i+1)
		}
	}
	lineOf := func(n *unstable.Node) int {
		if n == nil || n.Raw.Length == 0 {
			return 0
		}
		off := int(n.Raw.Offset)
		return sort.Search(len(starts), func(i int) bool { return starts[i] > off })
	}
	set := func(path string, line int) {
		if _, ok := pos.lines[path]; !ok && line > 0 {
			pos.lines[path] = line
		}
	}
	// arrays counts the elements of each array of tables so far, by its
	// resolved path; a key through such an array refers to its last
	// element, as TOML defines.
	arrays := map[string]int{}
	resolve := func(parts []string) string {
		path := ""
		for _, part := range parts {
			path = join(path, part)
			if n := arrays[path]; n > 0 {
				path += "[" + strconv.Itoa(n-1) + "]"
			}
		}
		return path
	}
	var walkValue func(path string, v *unstable.Node, line int)
	walkValue = func(path string, v *unstable.Node, line int) {
		switch v.Kind {
		case unstable.Array:
			i := 0
			it := v.Children()
			for it.Next() {
				c := it.Node()
				if c.Kind == unstable.Comment {
					continue
				}
				el := path + "[" + strconv.Itoa(i) + "]"
				l := lineOf(c)
				if l == 0 {
					l = line
				}
				set(el, l)
				walkValue(el, c, l)
				i++
			}
		case unstable.InlineTable:
			it := v.Children()
			for it.Next() {
				kv := it.Node()
				if kv.Kind != unstable.KeyValue {
					continue
				}
				walkKeyValue(path, kv, lineOf, set, walkValue)
			}
		}
	}
	p := unstable.Parser{}
	p.Reset(data)
	cur := ""
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table:
			parts, first := keyParts(e)
			cur = resolve(parts)
			set(cur, lineOf(first))
		case unstable.ArrayTable:
			parts, first := keyParts(e)
			prefix := resolve(parts[:len(parts)-1])
			base := join(prefix, parts[len(parts)-1])
			set(base, lineOf(first))
			cur = base + "[" + strconv.Itoa(arrays[base]) + "]"
			arrays[base]++
			set(cur, lineOf(first))
		case unstable.KeyValue:
			walkKeyValue(cur, e, lineOf, set, walkValue)
		}
	}
	return pos
}

// walkKeyValue records a (possibly dotted) key and its value under table.
func walkKeyValue(table string, kv *unstable.Node, lineOf func(*unstable.Node) int, set func(string, int),
	walkValue func(string, *unstable.Node, int)) {
	parts, first := keyParts(kv)
	line := lineOf(first)
	path := table
	for _, part := range parts {
		path = join(path, part)
		set(path, line)
	}
	walkValue(path, kv.Value(), line)
}

// keyParts returns the parts of a node's key and its first key node.
func keyParts(n *unstable.Node) ([]string, *unstable.Node) {
	var parts []string
	var first *unstable.Node
	it := n.Key()
	for it.Next() {
		k := it.Node()
		if first == nil {
			first = k
		}
		parts = append(parts, string(k.Data))
	}
	return parts, first
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}
