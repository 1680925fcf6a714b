package control

import (
	"errors"
	"strconv"

	"github.com/meshlink/meshlink/wire"
)

// parseLight fills m from one map-stream line, reading only the fields a
// lightMsg holds and skipping the rest without decoding it. It stands in
// for json.Unmarshal into a lightMsg, which validates and walks every byte
// of every peer: 10,000 simulated agents on the coordinator's own machine
// spent most of the generator's CPU there (a real agent decodes its one
// map on its own machine), and the CPU the generator takes is the
// coordinator's lost. It does not validate what it skips: the input is the
// coordinator's own encoding/json output, and TestParseLight checks it
// against json.Unmarshal.
func parseLight(b []byte, m *lightMsg) error {
	p := lightParser{b: b}
	err := p.object(func(k []byte) error {
		switch string(k) {
		case "full":
			if p.null() {
				return nil
			}
			m.Full = &struct {
				Peers    []lightNode    `json:"peers"`
				Services []lightService `json:"services"`
			}{}
			return p.object(func(k []byte) error {
				switch string(k) {
				case "peers":
					return p.nodes(&m.Full.Peers)
				case "services":
					return p.services(&m.Full.Services)
				}
				return p.skip()
			})
		case "peers_changed":
			return p.nodes(&m.PeersChanged)
		case "services_changed":
			return p.services(&m.ServicesChanged)
		case "peers_removed":
			return p.array(func() error {
				v, err := p.uint()
				m.PeersRemoved = append(m.PeersRemoved, wire.NodeID(v))
				return err
			})
		case "services_removed":
			return p.array(func() error {
				s, err := p.str()
				m.ServicesRemoved = append(m.ServicesRemoved, string(s))
				return err
			})
		}
		return p.skip()
	})
	if err != nil {
		return err
	}
	p.ws()
	if p.i != len(p.b) {
		return p.err("trailing data")
	}
	return nil
}

type lightParser struct {
	b []byte
	i int
}

var errLight = errors.New("control: malformed map message")

func (p *lightParser) err(what string) error {
	return errors.Join(errLight, errors.New(what+" at offset "+strconv.Itoa(p.i)))
}

func (p *lightParser) ws() {
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case ' ', '\t', '\n', '\r':
			p.i++
		default:
			return
		}
	}
}

// want consumes byte c after white space.
func (p *lightParser) want(c byte) error {
	p.ws()
	if p.i >= len(p.b) || p.b[p.i] != c {
		return p.err("want " + string(c))
	}
	p.i++
	return nil
}

// peek returns the next byte after white space (0 at the end).
func (p *lightParser) peek() byte {
	p.ws()
	if p.i >= len(p.b) {
		return 0
	}
	return p.b[p.i]
}

// null consumes a null if one is next.
func (p *lightParser) null() bool {
	if p.peek() == 'n' && p.i+4 <= len(p.b) && string(p.b[p.i:p.i+4]) == "null" {
		p.i += 4
		return true
	}
	return false
}

// object calls f for each key, positioned at its value, which f must
// consume.
func (p *lightParser) object(f func(key []byte) error) error {
	if err := p.want('{'); err != nil {
		return err
	}
	if p.peek() == '}' {
		p.i++
		return nil
	}
	for {
		k, err := p.str()
		if err != nil {
			return err
		}
		if err := p.want(':'); err != nil {
			return err
		}
		if err := f(k); err != nil {
			return err
		}
		switch p.peek() {
		case ',':
			p.i++
		case '}':
			p.i++
			return nil
		default:
			return p.err("want , or }")
		}
	}
}

// array calls f for each element (null is an empty array).
func (p *lightParser) array(f func() error) error {
	if p.null() {
		return nil
	}
	if err := p.want('['); err != nil {
		return err
	}
	if p.peek() == ']' {
		p.i++
		return nil
	}
	for {
		if err := f(); err != nil {
			return err
		}
		switch p.peek() {
		case ',':
			p.i++
		case ']':
			p.i++
			return nil
		default:
			return p.err("want , or ]")
		}
	}
}

// str returns a string's raw bytes (escapes left as they are: the keys
// and names read here have none).
func (p *lightParser) str() ([]byte, error) {
	if err := p.want('"'); err != nil {
		return nil, err
	}
	start := p.i
	for p.i < len(p.b) {
		switch p.b[p.i] {
		case '"':
			p.i++
			return p.b[start : p.i-1], nil
		case '\\':
			p.i++
		}
		p.i++
	}
	return nil, p.err("unterminated string")
}

func (p *lightParser) uint() (uint64, error) {
	p.ws()
	start := p.i
	for p.i < len(p.b) && p.b[p.i] >= '0' && p.b[p.i] <= '9' {
		p.i++
	}
	v, err := strconv.ParseUint(string(p.b[start:p.i]), 10, 64)
	if err != nil {
		return 0, p.err("want a number")
	}
	return v, nil
}

func (p *lightParser) bool() (bool, error) {
	switch {
	case p.peek() == 't' && p.i+4 <= len(p.b) && string(p.b[p.i:p.i+4]) == "true":
		p.i += 4
		return true, nil
	case p.peek() == 'f' && p.i+5 <= len(p.b) && string(p.b[p.i:p.i+5]) == "false":
		p.i += 5
		return false, nil
	}
	return false, p.err("want a boolean")
}

// skip consumes one value of any kind.
func (p *lightParser) skip() error {
	switch c := p.peek(); c {
	case '"':
		_, err := p.str()
		return err
	case '{':
		return p.object(func([]byte) error { return p.skip() })
	case '[':
		return p.array(p.skip)
	case 0:
		return p.err("want a value")
	default:
		start := p.i
		for p.i < len(p.b) {
			switch p.b[p.i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				if p.i == start {
					return p.err("want a value")
				}
				return nil
			}
			p.i++
		}
		if p.i == start {
			return p.err("want a value")
		}
		return nil
	}
}

func (p *lightParser) nodes(out *[]lightNode) error {
	return p.array(func() error {
		var n lightNode
		err := p.object(func(k []byte) error {
			var err error
			switch string(k) {
			case "id":
				var v uint64
				v, err = p.uint()
				n.ID = wire.NodeID(v)
			case "online":
				n.Online, err = p.bool()
			default:
				err = p.skip()
			}
			return err
		})
		*out = append(*out, n)
		return err
	})
}

func (p *lightParser) services(out *[]lightService) error {
	return p.array(func() error {
		var s lightService
		err := p.object(func(k []byte) error {
			switch string(k) {
			case "name":
				b, err := p.str()
				s.Name = string(b)
				return err
			case "port":
				v, err := p.uint()
				if v > 65535 {
					return p.err("port out of range")
				}
				s.Port = uint16(v)
				return err
			}
			return p.skip()
		})
		*out = append(*out, s)
		return err
	})
}
