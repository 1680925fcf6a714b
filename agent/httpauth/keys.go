package httpauth

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Bounds of a key set.
const (
	// MaxJWKSSize bounds a JWKS document (URL or file) in bytes.
	MaxJWKSSize = 1 << 20
	// MaxKeys bounds the keys kept of one JWKS.
	MaxKeys = 100
	// FetchTimeout bounds one JWKS fetch.
	FetchTimeout = 5 * time.Second
	// RefreshEvery is how old a key set may grow before a request
	// fetches it again.
	RefreshEvery = 10 * time.Minute
	// MinRefetch is the least time between two fetches caused by tokens
	// naming a key the set does not hold, so that a stream of tokens with
	// made-up kids cannot make the provider hammer the issuer.
	MinRefetch = 10 * time.Second
)

// keySource holds one issuer's public keys, read from a JWKS URL or file
// and kept until RefreshEvery; a token naming an unknown kid makes it read
// them again, at most once every MinRefetch.
type keySource struct {
	url, file string
	client    *http.Client
	now       func() time.Time

	fetchMu sync.Mutex // serialises fetches; held while one runs

	mu      sync.Mutex // guards the fields below
	keys    []jose.JSONWebKey
	fetched time.Time // last good fetch
	tried   time.Time // last fetch, good or not
	err     error     // of the last fetch
	fetches int       // fetches so far (tests)
	gen     uint64    // counts key sets read; tokens verified under another are checked again
}

func newKeySource(url, file string, client *http.Client, now func() time.Time) *keySource {
	return &keySource{url: url, file: file, client: client, now: now}
}

// errNoKeys: the key set could not be read and none is held.
var errNoKeys = errors.New("the issuer's keys are not available")

// lookup returns the keys a token with kid ("" for none) may be signed
// with, reading the set when it is missing, old, or (rate-limited) lacks
// kid.
func (ks *keySource) lookup(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	now := ks.now()
	ks.mu.Lock()
	keys, fetched, tried := ks.keys, ks.fetched, ks.tried
	ks.mu.Unlock()
	stale := fetched.IsZero() || now.Sub(fetched) > RefreshEvery
	found := match(keys, kid)
	// A set never read, or old, is read again (at most every MinRefetch
	// when reading fails); one lacking kid likewise.
	if (stale || len(found) == 0) && (tried.IsZero() || now.Sub(tried) >= MinRefetch) {
		ks.refresh(ctx, tried)
		ks.mu.Lock()
		keys = ks.keys
		ks.mu.Unlock()
		found = match(keys, kid)
	}
	if keys == nil {
		ks.mu.Lock()
		err := ks.err
		ks.mu.Unlock()
		return nil, fmt.Errorf("%w: %v", errNoKeys, err)
	}
	return found, nil
}

// refresh reads the set unless another call did since seen.
func (ks *keySource) refresh(ctx context.Context, seen time.Time) {
	ks.fetchMu.Lock()
	defer ks.fetchMu.Unlock()
	ks.mu.Lock()
	done := !ks.tried.Equal(seen)
	ks.mu.Unlock()
	if done {
		return // another request fetched while this one waited
	}
	keys, err := ks.read(ctx)
	ks.mu.Lock()
	defer ks.mu.Unlock()
	ks.tried, ks.err = ks.now(), err
	ks.fetches++
	if err == nil {
		ks.keys, ks.fetched = keys, ks.tried
		ks.gen++
	}
}

func (ks *keySource) read(ctx context.Context) ([]jose.JSONWebKey, error) {
	var data []byte
	if ks.file != "" {
		f, err := os.Open(ks.file)
		if err != nil {
			return nil, fmt.Errorf("jwksFile: %w", err)
		}
		defer f.Close()
		if data, err = io.ReadAll(io.LimitReader(f, MaxJWKSSize+1)); err != nil {
			return nil, fmt.Errorf("jwksFile: %w", err)
		}
	} else {
		ctx, cancel := context.WithTimeout(ctx, FetchTimeout)
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, ks.url, nil)
		if err != nil {
			return nil, fmt.Errorf("jwksURL: %w", err)
		}
		req.Header.Set("Accept", "application/json")
		resp, err := ks.client.Do(req)
		if err != nil {
			return nil, fmt.Errorf("jwksURL: %w", err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("jwksURL %s: %s", ks.url, resp.Status)
		}
		if data, err = io.ReadAll(io.LimitReader(resp.Body, MaxJWKSSize+1)); err != nil {
			return nil, fmt.Errorf("jwksURL %s: %w", ks.url, err)
		}
	}
	if len(data) > MaxJWKSSize {
		return nil, fmt.Errorf("the JWKS is larger than %d bytes", MaxJWKSSize)
	}
	return parseJWKS(data)
}

// parseJWKS reads a JWKS document, keeping its public signing keys: a
// key of an unknown type, a symmetric key or one for encryption is
// skipped rather than failing the set; a private key is kept as its
// public half.
func parseJWKS(data []byte) ([]jose.JSONWebKey, error) {
	var doc struct {
		Keys []json.RawMessage `json:"keys"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("the JWKS is not a JSON key set: %w", err)
	}
	keys := []jose.JSONWebKey{}
	for _, raw := range doc.Keys {
		var k jose.JSONWebKey
		if err := k.UnmarshalJSON(raw); err != nil || !k.Valid() {
			continue
		}
		if k.Use != "" && k.Use != "sig" {
			continue
		}
		if !k.IsPublic() {
			if _, sym := k.Key.([]byte); sym {
				continue // never HMAC with a published key
			}
			k = k.Public()
			if !k.Valid() {
				continue
			}
		}
		keys = append(keys, k)
		if len(keys) == MaxKeys {
			break
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("the JWKS holds no public signing key")
	}
	return keys, nil
}

// match is the keys a token with kid may be signed with: those with that
// kid, or every key when the token names none.
func match(keys []jose.JSONWebKey, kid string) []jose.JSONWebKey {
	if kid == "" {
		return keys
	}
	var out []jose.JSONWebKey
	for _, k := range keys {
		if k.KeyID == kid {
			out = append(out, k)
		}
	}
	return out
}

// generation is the count of key sets read so far.
func (ks *keySource) generation() uint64 {
	ks.mu.Lock()
	defer ks.mu.Unlock()
	return ks.gen
}
