package topo

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Delay without netem: a rule in the host's namespace (nft's queue
// statement, or iptables' NFQUEUE target where the kernel lacks the former)
// hands every packet leaving through the interface to an NFQUEUE, and a
// reader in the test process, bound to that queue over a netlink socket made
// inside the namespace, gives each packet its verdict (accept) d after it was
// queued. Only the packet's metadata crosses to userspace, never its payload.
//
// All packets get the same delay, so they leave in the order they came:
// one FIFO and one goroutine that, when the oldest deadlines have passed,
// accepts every packet up to the newest of them with a single batch verdict.

// The constants of linux/netfilter/nfnetlink_queue.h and nfnetlink.h that
// golang.org/x/sys/unix does not define.
const (
	nfqnlMsgPacket       = 0 // NFQNL_MSG_PACKET: kernel to userspace
	nfqnlMsgConfig       = 2 // NFQNL_MSG_CONFIG
	nfqnlMsgVerdictBatch = 3 // NFQNL_MSG_VERDICT_BATCH: every id <= the given one

	nfqaPacketHdr  = 1 // NFQA_PACKET_HDR: struct nfqnl_msg_packet_hdr, id first (be32)
	nfqaVerdictHdr = 2 // NFQA_VERDICT_HDR: struct nfqnl_msg_verdict_hdr {be32 verdict, be32 id}

	nfqaCfgCmd         = 1 // NFQA_CFG_CMD: struct nfqnl_msg_config_cmd {u8 cmd, u8 pad, be16 pf}
	nfqaCfgParams      = 2 // NFQA_CFG_PARAMS: struct nfqnl_msg_config_params {be32 range, u8 mode} (packed)
	nfqaCfgQueueMaxlen = 3 // NFQA_CFG_QUEUE_MAXLEN: be32
	nfqaCfgMask        = 4 // NFQA_CFG_MASK: be32
	nfqaCfgFlags       = 5 // NFQA_CFG_FLAGS: be32

	nfqnlCfgCmdBind = 1 // NFQNL_CFG_CMD_BIND
	nfqnlCopyMeta   = 1 // NFQNL_COPY_META: no payload
	nfqaCfgFGSO     = 1 << 2

	nfAccept = 1 // NF_ACCEPT

	nlaTypeMask = ^uint16(unix.NLA_F_NESTED | unix.NLA_F_NET_BYTEORDER)
)

const (
	// delayQueueBase numbers the queues of Delay: queues are per namespace,
	// and each Host hands out its own, from here up.
	delayQueueBase = 4200
	// delayQueueMaxlen is how many packets the kernel holds for a queue
	// before it drops new ones: a generous buffer for 50 ms of traffic
	// (with GSO on, one entry can be a 64 KB TCP burst).
	delayQueueMaxlen = 16384
	// delayRcvbuf is the socket buffer for the packet notifications. When
	// it overflows anyway (the reader gets ENOBUFS), the kernel has dropped
	// the packets whose notices did not fit (the user_dropped column of
	// /proc/net/netfilter/nfnetlink_queue): a full buffer, as on a router.
	delayRcvbuf = 16 << 20
	// flushSpan is added to the last id seen for a verdict that accepts
	// every packet in the queue: batch verdicts compare ids with
	// wraparound, so anything within 2^31 after the id counts as before.
	flushSpan = 1 << 30
)

// missingQueue matches what nft and iptables say when the kernel lacks the
// queue expression or the NFQUEUE target, or the tool is not installed.
var missingQueue = regexp.MustCompile(`Could not process rule: No such file or directory|No chain/target/match by that name|Extension NFQUEUE|not supported|executable file not found`)

// delayer is the reader bound to one queue.
type delayer struct {
	h     *Host
	iface string
	queue uint16
	f     *os.File
	conn  syscall.RawConn
	d     atomic.Int64 // the delay, in nanoseconds
	last  atomic.Uint32
	seq   atomic.Uint32

	mu         sync.Mutex // guards the fields below
	fifo       []pending
	drainUntil time.Time // when draining: stop once the FIFO is empty after this
	draining   bool
	err        error // the first thing that went wrong

	wake      chan struct{} // a packet was queued, or draining started
	done      chan struct{} // closed to stop both goroutines
	drained   chan struct{} // closed when the verdict goroutine ends
	readDone  chan struct{}
	closeOnce sync.Once
}

// pending is a verdict to give: accept every packet up to id.
type pending struct {
	id       uint32
	deadline time.Time
}

// Delay holds every packet leaving the host through iface, sent or
// forwarded, for d before letting it go, as netem's "delay" would, but
// without netem: the packets wait in an NFQUEUE that the test process
// reads. A second call changes the delay; d = 0 removes it, letting what is
// still held go after its delay. The Net's Close stops it.
//
// It needs the kernel's nfnetlink_queue (CONFIG_NETFILTER_NETLINK_QUEUE) and
// either nft with CONFIG_NFT_QUEUE or iptables and ip6tables with the NFQUEUE
// target; without them the error matches errors.ErrUnsupported. Each packet
// costs the test process a notification and part of a verdict, which is fine
// for the tens of MB/s a test moves, not for benchmarks.
//
// Unlike netem, a held packet still counts against the socket that sent it,
// so TCP that the host itself sends through iface is throttled by TCP Small
// Queues to about two packets per delay (~60 KB/s at 50 ms). Forwarded
// traffic (a Router's WAN) and what the host only answers (ACKs, echoes) are
// not: put the delay on a router, or on the receiving side, for bulk TCP.
func (h *Host) Delay(iface string, d time.Duration) error {
	if d < 0 {
		return fmt.Errorf("topo: delay %v: negative", d)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	cur := h.delays[iface]
	if d == 0 {
		if cur == nil {
			return nil // a failed call cleans up after itself
		}
		delete(h.delays, iface)
		h.n.removeDelayer(cur)
		err := h.queueRule(iface, cur.queue, false)
		if err == nil {
			// The rule is gone: nothing new gets queued. Packets already
			// held still get their delay before the reader unbinds.
			err = cur.drain()
		} else {
			cur.close()
		}
		return errors.Join(err, cur.result())
	}
	if cur != nil {
		select {
		case <-cur.done:
			return fmt.Errorf("topo: delay on %s/%s: stopped (Net closed?)", h.name, iface)
		default:
		}
		cur.d.Store(int64(d))
		return nil
	}

	if h.delays == nil {
		h.delays = map[string]*delayer{}
	}
	h.nextQueue++
	q := delayQueueBase + h.nextQueue
	dl, err := h.newDelayer(iface, uint16(q), d)
	if err != nil {
		return err
	}
	if !h.n.addDelayer(dl) {
		dl.close()
		return fmt.Errorf("topo: delay on %s/%s: Net already closed", h.name, iface)
	}
	// The rule is added only once the reader is bound: without a reader a
	// queue drops what reaches it.
	if err := h.queueRule(iface, uint16(q), true); err != nil {
		dl.close()
		return fmt.Errorf("topo: delay on %s/%s: %w", h.name, iface, err)
	}
	h.delays[iface] = dl
	return nil
}

// queueRule adds (on) or removes the rule that sends every packet leaving
// through iface, sent or forwarded, to queue q. nft's queue statement needs
// CONFIG_NFT_QUEUE, which some kernels lack while they have iptables'
// NFQUEUE target (through nft_compat), so iptables and ip6tables are the
// fallback. Removing removes both kinds and is idempotent.
func (h *Host) queueRule(iface string, q uint16, on bool) error {
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	table := "topo_delay_" + iface
	var errs []error
	if _, err := exec.LookPath("nft"); err == nil {
		script := fmt.Sprintf("table inet %s {}\ndelete table inet %s\n", table, table)
		if on {
			// Priority 300: after Loss (0), so that what Loss drops is
			// not held first, and after the source NAT (100).
			script += fmt.Sprintf(`table inet %s {
	chain post {
		type filter hook postrouting priority 300; policy accept;
		oifname %q queue num %d
	}
}
`, table, iface, q)
		}
		_, err := run(ctx, strings.NewReader(script), "ip", "netns", "exec", h.ns, "nft", "-f", "-")
		if err == nil && on {
			return nil
		}
		if err != nil {
			errs = append(errs, err)
		}
	}
	// The iptables rule sits in mangle POSTROUTING, before the source NAT
	// and before Loss: packets that Loss then drops are held first, which
	// changes nothing but the work done.
	rule := []string{"POSTROUTING", "-o", iface, "-j", "NFQUEUE", "--queue-num", strconv.Itoa(int(q))}
	ipt := func(cmd, op string) error {
		_, err := run(ctx, nil, "ip", append([]string{"netns", "exec", h.ns, cmd, "-w", "-t", "mangle", op}, rule...)...)
		return err
	}
	var added []string
	for _, cmd := range []string{"iptables", "ip6tables"} {
		if _, err := exec.LookPath(cmd); err != nil {
			if on {
				errs = append(errs, fmt.Errorf("%s: %w", cmd, err))
			}
			continue
		}
		if on {
			if err := ipt(cmd, "-A"); err != nil {
				errs = append(errs, err)
				break
			}
			added = append(added, cmd)
			continue
		}
		for ipt(cmd, "-C") == nil {
			if err := ipt(cmd, "-D"); err != nil {
				errs = append(errs, err)
				break
			}
		}
	}
	if on {
		if len(added) == 2 {
			return nil
		}
		for _, cmd := range added {
			_ = ipt(cmd, "-D")
		}
		err := errors.Join(errs...)
		missing := true
		for _, e := range errs {
			missing = missing && missingQueue.MatchString(e.Error())
		}
		if missing {
			err = fmt.Errorf("%w: %w", errors.ErrUnsupported, err)
		}
		return fmt.Errorf("no queue rule: %w", err)
	}
	return errors.Join(errs...)
}

// addDelayer records dl for Close; false if the Net is already closed.
func (n *Net) addDelayer(dl *delayer) bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return false
	}
	n.delayers = append(n.delayers, dl)
	return true
}

// removeDelayer forgets dl, which its caller stops.
func (n *Net) removeDelayer(dl *delayer) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i, x := range n.delayers {
		if x == dl {
			n.delayers = append(n.delayers[:i], n.delayers[i+1:]...)
			return
		}
	}
}

// newDelayer opens a netlink socket inside the host's namespace, binds it
// to queue q and starts the reader and the verdict goroutine.
func (h *Host) newDelayer(iface string, q uint16, d time.Duration) (*delayer, error) {
	fd := -1
	err := h.inNS(func() (err error) {
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_NETFILTER)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("topo: delay on %s/%s: netlink socket: %w", h.name, iface, err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("topo: delay on %s/%s: bind: %w", h.name, iface, err)
	}
	if unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, delayRcvbuf) != nil {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, delayRcvbuf)
	}
	// A non-blocking fd makes the File pollable: Close then wakes a reader
	// blocked in Read, and read deadlines work.
	f := os.NewFile(uintptr(fd), fmt.Sprintf("nfqueue-%s-%s-%d", h.name, iface, q))
	conn, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	dl := &delayer{
		h: h, iface: iface, queue: q, f: f, conn: conn,
		wake:     make(chan struct{}, 1),
		done:     make(chan struct{}),
		drained:  make(chan struct{}),
		readDone: make(chan struct{}),
	}
	dl.d.Store(int64(d))

	var attrs []byte
	cmd := []byte{nfqnlCfgCmdBind, 0, 0, 0} // pf is ignored since Linux 3.8
	attrs = appendAttr(attrs, nfqaCfgCmd, cmd)
	params := binary.BigEndian.AppendUint32(nil, 0) // copy range: none
	params = append(params, nfqnlCopyMeta)
	attrs = appendAttr(attrs, nfqaCfgParams, params)
	attrs = appendAttr(attrs, nfqaCfgQueueMaxlen, binary.BigEndian.AppendUint32(nil, delayQueueMaxlen))
	// GSO: a TCP burst is queued as the one large packet it is, instead of
	// being cut into MTU-sized ones first, since the payload is never read.
	attrs = appendAttr(attrs, nfqaCfgMask, binary.BigEndian.AppendUint32(nil, nfqaCfgFGSO))
	attrs = appendAttr(attrs, nfqaCfgFlags, binary.BigEndian.AppendUint32(nil, nfqaCfgFGSO))
	if err := dl.request(nfqnlMsgConfig, attrs); err != nil {
		f.Close()
		if errors.Is(err, unix.EPROTONOSUPPORT) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.EOPNOTSUPP) {
			err = fmt.Errorf("%w (%v)", errors.ErrUnsupported, err)
		}
		return nil, fmt.Errorf("topo: delay on %s/%s: bind queue %d: %w", h.name, iface, q, err)
	}
	go dl.read()
	go dl.deliver()
	return dl, nil
}

// request sends a config message and waits for its acknowledgement. It is
// only used before the reader starts.
func (dl *delayer) request(typ uint8, attrs []byte) error {
	seq := dl.seq.Add(1)
	msg := dl.message(typ, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq, attrs)
	if err := dl.send(msg); err != nil {
		return err
	}
	if err := dl.f.SetReadDeadline(time.Now().Add(opTimeout)); err != nil {
		return err
	}
	defer dl.f.SetReadDeadline(time.Time{})
	buf := make([]byte, 8192)
	for {
		n, err := dl.recv(buf)
		if err != nil {
			return err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if m.Header.Type != unix.NLMSG_ERROR || m.Header.Seq != seq {
				continue
			}
			if len(m.Data) < 4 {
				return errors.New("short netlink error message")
			}
			if code := int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				return syscall.Errno(-code)
			}
			return nil
		}
	}
}

// message builds a netlink message of the nfqueue subsystem for this queue.
func (dl *delayer) message(typ uint8, flags uint16, seq uint32, attrs []byte) []byte {
	size := unix.SizeofNlMsghdr + 4 + len(attrs)
	b := make([]byte, 0, size)
	b = binary.NativeEndian.AppendUint32(b, uint32(size))
	b = binary.NativeEndian.AppendUint16(b, unix.NFNL_SUBSYS_QUEUE<<8|uint16(typ))
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, seq)
	b = binary.NativeEndian.AppendUint32(b, 0) // to the kernel
	// struct nfgenmsg: family, version, res_id (the queue, big-endian).
	b = append(b, unix.AF_UNSPEC, unix.NFNETLINK_V0)
	b = binary.BigEndian.AppendUint16(b, dl.queue)
	return append(b, attrs...)
}

// appendAttr appends a netlink attribute, padded to 4 bytes.
func appendAttr(b []byte, typ uint16, data []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(unix.SizeofNlAttr+len(data)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, data...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func (dl *delayer) send(msg []byte) error {
	var serr error
	err := dl.conn.Write(func(fd uintptr) bool {
		serr = unix.Sendto(int(fd), msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK})
		return serr != unix.EAGAIN
	})
	if err != nil {
		return err
	}
	return serr
}

// recv reads one datagram, waiting in the poller (so Close and read
// deadlines end the wait).
func (dl *delayer) recv(buf []byte) (int, error) {
	var n int
	var rerr error
	err := dl.conn.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), buf, 0)
		return rerr != unix.EAGAIN
	})
	if err != nil {
		return 0, err
	}
	return n, rerr
}

// read takes the kernel's packet notices and queues their verdicts.
func (dl *delayer) read() {
	defer close(dl.readDone)
	buf := make([]byte, 1<<16)
	for {
		n, err := dl.recv(buf)
		switch {
		case errors.Is(err, unix.ENOBUFS), errors.Is(err, unix.EINTR):
			// ENOBUFS: notices did not fit, and the kernel dropped their
			// packets rather than queue them. Nothing waits for us.
			continue
		case err != nil:
			select {
			case <-dl.done: // closed
			default:
				dl.fail(fmt.Errorf("read: %w", err))
			}
			return
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			dl.fail(fmt.Errorf("parse: %w", err))
			continue
		}
		for _, m := range msgs {
			switch m.Header.Type {
			case unix.NFNL_SUBSYS_QUEUE<<8 | nfqnlMsgPacket:
				if id, ok := packetID(m.Data); ok {
					dl.last.Store(id)
					dl.push(pending{id: id})
				}
			case unix.NLMSG_ERROR:
				// Verdicts ask for no acknowledgement, so this is an
				// error. ENOENT: a flush found the queue already empty.
				if len(m.Data) >= 4 {
					code := -int32(binary.NativeEndian.Uint32(m.Data))
					if code != 0 && syscall.Errno(code) != unix.ENOENT {
						dl.fail(fmt.Errorf("verdict: %w", syscall.Errno(code)))
					}
				}
			}
		}
	}
}

// packetID finds NFQA_PACKET_HDR in a packet notice (after the nfgenmsg).
func packetID(data []byte) (uint32, bool) {
	if len(data) < 4 {
		return 0, false
	}
	b := data[4:]
	for len(b) >= unix.SizeofNlAttr {
		l := int(binary.NativeEndian.Uint16(b))
		typ := binary.NativeEndian.Uint16(b[2:]) & nlaTypeMask
		if l < unix.SizeofNlAttr || l > len(b) {
			return 0, false
		}
		if typ == nfqaPacketHdr && l >= unix.SizeofNlAttr+4 {
			return binary.BigEndian.Uint32(b[unix.SizeofNlAttr:]), true
		}
		l = (l + 3) &^ 3
		if l > len(b) {
			break
		}
		b = b[l:]
	}
	return 0, false
}

func (dl *delayer) push(p pending) {
	p.deadline = time.Now().Add(time.Duration(dl.d.Load()))
	dl.mu.Lock()
	dl.fifo = append(dl.fifo, p)
	dl.mu.Unlock()
	select {
	case dl.wake <- struct{}{}:
	default:
	}
}

// deliver gives the verdicts, in order, as their deadlines pass.
func (dl *delayer) deliver() {
	defer close(dl.drained)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		dl.mu.Lock()
		// Ids grow (with wraparound) in the order packets were queued: one
		// batch verdict for the newest ready id covers the others.
		var maxID uint32
		ready := 0
		for ready < len(dl.fifo) && !dl.fifo[ready].deadline.After(now) {
			maxID = dl.fifo[ready].id
			ready++
		}
		dl.fifo = dl.fifo[ready:]
		if len(dl.fifo) == 0 {
			dl.fifo = nil // let the backing array go
		}
		var wait time.Duration = -1
		if len(dl.fifo) > 0 {
			wait = dl.fifo[0].deadline.Sub(now)
		}
		finish := dl.draining && len(dl.fifo) == 0 && !now.Before(dl.drainUntil)
		if dl.draining && wait < 0 && !finish {
			wait = dl.drainUntil.Sub(now)
		}
		dl.mu.Unlock()

		if ready > 0 {
			if err := dl.verdict(maxID); err != nil {
				select {
				case <-dl.done:
					return
				default:
				}
				dl.fail(fmt.Errorf("verdict: %w", err))
			}
		}
		if finish {
			// Anything still queued that was never read (there should be
			// none) goes too, rather than being dropped by the unbind.
			_ = dl.verdict(dl.last.Load() + flushSpan)
			return
		}
		if ready > 0 {
			continue // the clock moved while sending
		}
		// Since Go 1.23 Reset and Stop leave no stale tick in timer.C.
		var tc <-chan time.Time
		if wait >= 0 {
			timer.Reset(wait)
			tc = timer.C
		} else {
			timer.Stop()
		}
		select {
		case <-dl.done:
			return
		case <-dl.wake:
		case <-tc:
		}
	}
}

// verdict accepts every packet of the queue up to id.
func (dl *delayer) verdict(id uint32) error {
	v := binary.BigEndian.AppendUint32(nil, nfAccept)
	v = binary.BigEndian.AppendUint32(v, id)
	return dl.send(dl.message(nfqnlMsgVerdictBatch, unix.NLM_F_REQUEST, dl.seq.Add(1), appendAttr(nil, nfqaVerdictHdr, v)))
}

func (dl *delayer) fail(err error) {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	if dl.err == nil {
		dl.err = fmt.Errorf("topo: delay on %s/%s: %w", dl.h.name, dl.iface, err)
	}
}

// result returns the first error the reader met.
func (dl *delayer) result() error {
	dl.mu.Lock()
	defer dl.mu.Unlock()
	return dl.err
}

// drain lets the packets still held go after their delay, then unbinds.
// Call it once nothing new can be queued.
func (dl *delayer) drain() error {
	d := time.Duration(dl.d.Load())
	dl.mu.Lock()
	dl.draining = true
	// A packet queued just before the rule went may not have been read yet:
	// wait at least one delay for it.
	dl.drainUntil = time.Now().Add(d)
	dl.mu.Unlock()
	select {
	case dl.wake <- struct{}{}:
	default:
	}
	var err error
	select {
	case <-dl.drained:
	case <-time.After(d + opTimeout):
		err = fmt.Errorf("topo: delay on %s/%s: still draining after %v", dl.h.name, dl.iface, d+opTimeout)
	}
	dl.close()
	return err
}

// close unbinds at once: the kernel drops whatever is still queued. It is
// safe to call more than once and from any goroutine.
func (dl *delayer) close() {
	dl.closeOnce.Do(func() {
		close(dl.done)
		dl.f.Close() // wakes the reader; closing the socket unbinds the queue
		<-dl.readDone
		<-dl.drained
	})
}
