package netstack

import (
	"errors"
	"testing"
)

func isRefused(err error) bool { return errors.Is(err, ErrConnRefused) }

// FuzzWrite feeds arbitrary bytes to Stack.Write, as a malicious or broken
// peer could through WireGuard. It must never panic, and Write must never
// fail for a live stack.
func FuzzWrite(f *testing.F) {
	f.Add(tcpSYN(peer4, own4, 80))
	f.Add(tcpSYN(peer6, own6, 80))
	f.Add(udpDatagram(peer4, own4, 53, []byte("hello")))
	f.Add(udpDatagram(peer6, own6, 53, []byte("hello")))
	f.Add(echoRequest(peer4, own4, []byte("ping")))
	f.Add(echoRequest(peer6, own6, []byte("ping")))
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0, 0xff, 0xff})
	f.Add([]byte{})

	s := newTestStack(f)
	s.SetUDPHandler(func(r *UDPRequest) {
		if c, err := r.Accept(); err == nil {
			c.Close()
		}
	})
	// Drain outbound packets so replies do not just pile up in the queue.
	go func() {
		bufs := make([][]byte, maxBatch)
		for i := range bufs {
			bufs[i] = make([]byte, 65535)
		}
		sizes := make([]int, maxBatch)
		for {
			if _, err := s.Read(bufs, sizes, 0); err != nil {
				return
			}
		}
	}()
	f.Fuzz(func(t *testing.T, data []byte) {
		if _, err := s.Write([][]byte{data}, 0); err != nil {
			t.Fatalf("Write: %v", err)
		}
		// Same bytes behind an offset, in a batch with a valid packet.
		buf := append(make([]byte, 16), data...)
		if _, err := s.Write([][]byte{buf, append(make([]byte, 16), tcpSYN(peer4, own4, 81)...)}, 16); err != nil {
			t.Fatalf("Write with offset: %v", err)
		}
	})
}
