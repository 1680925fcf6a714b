// Package layout has no code: its tests hold the module to the layout of
// docs/architecture.md — which package may import which, and a doc comment
// on every package — in the spirit of tailscale's tstest/deptest.
package layout
