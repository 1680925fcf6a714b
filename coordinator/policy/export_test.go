package policy

// WithoutIndex is p evaluated by walking every rule, as before the index.
func WithoutIndex(p *Policy) *Policy {
	q := *p
	q.idx = nil
	return &q
}
