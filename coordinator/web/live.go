package web

import (
	"errors"
	"sync"
)

// Bounds on open live feeds (GET /console/events): each holds a request,
// a goroutine and a snapshot per change, so a signed-in member must not
// open them without end.
const (
	maxLivePerSession = 8
	maxLivePerUser    = 32
	maxLive           = 1024
)

var (
	errLiveSession = errors.New("this session already has the most live views open; close some console tabs")
	errLiveUser    = errors.New("this account already has the most live views open; close some console tabs or sign out elsewhere")
	errLiveAll     = errors.New("the coordinator serves as many live views as it allows; try again later")
)

// liveSet counts the open live feeds.
type liveSet struct {
	mu        sync.Mutex // guards the fields below
	n         int
	bySession map[string]int
	byUser    map[int64]int
}

func newLiveSet() *liveSet {
	return &liveSet{bySession: map[string]int{}, byUser: map[int64]int{}}
}

// acquire counts a feed of session and user, or refuses it; release gives
// the place back.
func (l *liveSet) acquire(session string, user int64) (release func(), err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.bySession[session] >= maxLivePerSession:
		return nil, errLiveSession
	case l.byUser[user] >= maxLivePerUser:
		return nil, errLiveUser
	case l.n >= maxLive:
		return nil, errLiveAll
	}
	l.n++
	l.bySession[session]++
	l.byUser[user]++
	var once sync.Once
	return func() {
		once.Do(func() {
			l.mu.Lock()
			defer l.mu.Unlock()
			l.n--
			if l.bySession[session]--; l.bySession[session] == 0 {
				delete(l.bySession, session)
			}
			if l.byUser[user]--; l.byUser[user] == 0 {
				delete(l.byUser, user)
			}
		})
	}, nil
}
