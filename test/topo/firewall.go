package topo

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
)

// firewall is the packet filter that routers and fault injections use:
// nftables where nft is installed, iptables otherwise. Both act only inside
// the given namespace.
type firewall interface {
	// masquerade rewrites the source of what leaves through iface to the
	// address of iface (source NAT, as a home router does).
	masquerade(ctx context.Context, ns, iface string) error
	// dropUDP drops (on) or stops dropping (off) UDP on every interface but
	// loopback, in, out and forwarded. Either call is idempotent.
	dropUDP(ctx context.Context, ns string, on bool) error
}

// pickFirewall prefers nft: it is the native interface of the kernels CI
// runs on, and Debian's iptables is itself a front end to nf_tables. The
// iptables path is kept for images that only ship iptables.
func pickFirewall() (firewall, error) {
	if _, err := exec.LookPath("nft"); err == nil {
		return nftables{}, nil
	}
	if _, err := exec.LookPath("iptables"); err == nil {
		return iptables{}, nil
	}
	return nil, fmt.Errorf("topo: neither nft nor iptables on PATH (apt-get install nftables): %w", errors.ErrUnsupported)
}

type nftables struct{}

func (nftables) apply(ctx context.Context, ns, script string) error {
	_, err := run(ctx, strings.NewReader(script), "ip", "netns", "exec", ns, "nft", "-f", "-")
	return err
}

func (f nftables) masquerade(ctx context.Context, ns, iface string) error {
	return f.apply(ctx, ns, fmt.Sprintf(`table ip topo_nat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname %q masquerade
	}
}
`, iface))
}

func (f nftables) dropUDP(ctx context.Context, ns string, on bool) error {
	// Declaring the table first makes the delete succeed whether or not it
	// existed, so both directions are idempotent.
	script := "table inet topo_udp {}\ndelete table inet topo_udp\n"
	if on {
		script += `table inet topo_udp {
	chain input {
		type filter hook input priority 0; policy accept;
		iifname != "lo" meta l4proto udp drop
	}
	chain forward {
		type filter hook forward priority 0; policy accept;
		meta l4proto udp drop
	}
	chain output {
		type filter hook output priority 0; policy accept;
		oifname != "lo" meta l4proto udp drop
	}
}
`
	}
	return f.apply(ctx, ns, script)
}

type iptables struct{}

func (iptables) ipt(ctx context.Context, ns string, args ...string) error {
	_, err := run(ctx, nil, "ip", append([]string{"netns", "exec", ns, "iptables", "-w"}, args...)...)
	return err
}

func (f iptables) masquerade(ctx context.Context, ns, iface string) error {
	return f.ipt(ctx, ns, "-t", "nat", "-A", "POSTROUTING", "-o", iface, "-j", "MASQUERADE")
}

func (f iptables) dropUDP(ctx context.Context, ns string, on bool) error {
	rules := [][]string{
		{"INPUT", "!", "-i", "lo", "-p", "udp", "-j", "DROP"},
		{"FORWARD", "-p", "udp", "-j", "DROP"},
		{"OUTPUT", "!", "-o", "lo", "-p", "udp", "-j", "DROP"},
	}
	for _, r := range rules {
		present := f.ipt(ctx, ns, append([]string{"-C"}, r...)...) == nil
		switch {
		case on && !present:
			if err := f.ipt(ctx, ns, append([]string{"-A"}, r...)...); err != nil {
				return err
			}
		case !on && present:
			if err := f.ipt(ctx, ns, append([]string{"-D"}, r...)...); err != nil {
				return err
			}
		}
	}
	return nil
}
