package netstack

import (
	"fmt"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
)

// SetTCPOption sets a stack-wide TCP option on s, for experiments (see
// applyTCPOpts in impair_test.go); connections created afterwards pick it
// up.
func SetTCPOption(s *Stack, opt tcpip.SettableTransportProtocolOption) error {
	if err := s.stack.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
		return fmt.Errorf("%s", err)
	}
	return nil
}

// TCPCounters returns some of gVisor's stack-wide TCP counters.
func TCPCounters(s *Stack) map[string]uint64 {
	st := s.stack.Stats().TCP
	return map[string]uint64{
		"segs-sent":     st.SegmentsSent.Value(),
		"retransmits":   st.Retransmits.Value(),
		"fast-rexmit":   st.FastRetransmit.Value(),
		"sack-recovery": st.SACKRecovery.Value(),
		"tlp-recovery":  st.TLPRecovery.Value(),
		"timeouts":      st.Timeouts.Value(),
		"dsack":         st.SegmentsAckedWithDSACK.Value(),
		"spurious":      st.SpuriousRecovery.Value(),
		"spurious-rto":  st.SpuriousRTORecovery.Value(),
		"ss-rexmit":     st.SlowStartRetransmits.Value(),
	}
}
