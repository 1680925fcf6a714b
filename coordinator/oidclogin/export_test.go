package oidclogin

// ResealWithNonce opens a login cookie and seals it again with another
// nonce, standing in for a cookie key compromise or a mixed-up login: the
// ID token's nonce must then fail to match.
func ResealWithNonce(p *Provider, cookie, nonce string) (string, error) {
	ls, err := p.open(cookie)
	if err != nil {
		return "", err
	}
	ls.Nonce = nonce
	return p.seal(ls)
}
