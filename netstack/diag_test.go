package netstack

import (
	"fmt"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"testing"
)

func (s *Stack) DiagString() string {
	st := s.stack.Stats()
	return "tcp retrans=" + u(st.TCP.Retransmits.Value()) + " fastrecov=" + u(st.TCP.FastRecovery.Value()) + " timeouts=" + u(st.TCP.Timeouts.Value()) + " segsSent=" + u(st.TCP.SegmentsSent.Value()) + " segsRecv=" + u(st.TCP.ValidSegmentsReceived.Value()) + " sendErr=" + u(st.TCP.SegmentSendErrors.Value()) + " sack=" + u(st.TCP.SACKRecovery.Value()) + " tlp=" + u(st.TCP.TLPRecovery.Value()) + " spurious=" + u(st.TCP.SpuriousRecovery.Value()) + " dsack=" + u(st.TCP.SegmentsAckedWithDSACK.Value()) + " slowstartRetx=" + u(st.TCP.SlowStartRetransmits.Value()) + " fastRetx=" + u(st.TCP.FastRetransmit.Value()) + s.epInfo()
}

func u(v uint64) string { return fmtU(v) }

var _ = testing.Short

func (s *Stack) epInfo() string {
	out := ""
	for _, ep := range s.stack.RegisteredEndpoints() {
		if e, ok := ep.(tcpip.Endpoint); ok {
			var info tcpip.TCPInfoOption
			if err := e.GetSockOpt(&info); err == nil {
				out += fmt.Sprintf(" [rtt=%v cwnd=%d ssthresh=%d state=%v sndbuf=%d rcvbuf=%d]", info.RTT, info.SndCwnd, info.SndSsthresh, info.State, e.SocketOptions().GetSendBufferSize(), e.SocketOptions().GetReceiveBufferSize())
				if ts, ok := e.Stats().(*tcp.Stats); ok {
					out += fmt.Sprintf(" segQDrop=%d zeroWnd=%d", ts.ReceiveErrors.SegmentQueueDropped.Value(), ts.ReceiveErrors.ZeroRcvWindowState.Value())
				}
			}
		}
	}
	return out
}
