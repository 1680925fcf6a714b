package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

// This file holds what the web console needs from the SQLite store: users
// by id, sessions and the event log.

const userCols = `id, username, password_hash, admin, created, must_change_password, pending`

func scanUser(r scanner) (User, error) {
	var u User
	var admin, mustChange, pending int
	var created int64
	if err := r.Scan(&u.ID, &u.Username, &u.PasswordHash, &admin, &created, &mustChange, &pending); err != nil {
		return u, err
	}
	u.Admin, u.Created, u.MustChangePassword, u.Pending = admin != 0, fromUnixNano(created), mustChange != 0, pending != 0
	return u, nil
}

// GetUserByID implements Store.
func (s *sqlStore) GetUserByID(ctx context.Context, id int64) (User, error) {
	u, err := scanUser(s.db.QueryRowContext(ctx, `SELECT `+userCols+` FROM users WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return u, fmt.Errorf("user %d: %w", id, ErrNotFound)
	}
	return u, err
}

// ListUsers implements Store.
func (s *sqlStore) ListUsers(ctx context.Context) ([]User, error) {
	return queryAll(ctx, s.db, scanUser, `SELECT `+userCols+` FROM users ORDER BY id`)
}

// CreateSession implements Store.
func (s *sqlStore) CreateSession(ctx context.Context, se Session) error {
	if se.Created.IsZero() {
		se.Created = time.Now()
	}
	_, err := s.exec(ctx, `INSERT INTO sessions (id_hash, user_id, csrf, created, expires) VALUES (?, ?, ?, ?, ?)`,
		se.IDHash, se.UserID, se.CSRF, unixNano(se.Created), unixNano(se.Expires))
	if err != nil {
		return fmt.Errorf("store: create session: %w", err)
	}
	return nil
}

// GetSession implements Store.
func (s *sqlStore) GetSession(ctx context.Context, idHash []byte, now time.Time) (Session, error) {
	var se Session
	var created, expires int64
	err := s.db.QueryRowContext(ctx, `SELECT id_hash, user_id, csrf, created, expires FROM sessions WHERE id_hash = ? AND expires > ?`,
		idHash, unixNano(now)).Scan(&se.IDHash, &se.UserID, &se.CSRF, &created, &expires)
	if errors.Is(err, sql.ErrNoRows) {
		return se, fmt.Errorf("session: %w", ErrNotFound)
	}
	se.Created, se.Expires = fromUnixNano(created), fromUnixNano(expires)
	return se, err
}

// TouchSession implements Store.
func (s *sqlStore) TouchSession(ctx context.Context, idHash []byte, expires time.Time) error {
	_, err := s.exec(ctx, `UPDATE sessions SET expires = ? WHERE id_hash = ?`, unixNano(expires), idHash)
	return err
}

// DeleteSession implements Store.
func (s *sqlStore) DeleteSession(ctx context.Context, idHash []byte) error {
	_, err := s.exec(ctx, `DELETE FROM sessions WHERE id_hash = ?`, idHash)
	return err
}

// DeleteExpiredSessions implements Store.
func (s *sqlStore) DeleteExpiredSessions(ctx context.Context, now time.Time) error {
	_, err := s.exec(ctx, `DELETE FROM sessions WHERE expires <= ?`, unixNano(now))
	return err
}

// AddEvent implements Store.
func (s *sqlStore) AddEvent(ctx context.Context, e Event) error {
	if e.At.IsZero() {
		e.At = time.Now()
	}
	return s.tx(ctx, func(tx *dbTx) error { return addEvent(ctx, tx, e) })
}

func addEvent(ctx context.Context, tx *dbTx, e Event) error {
	{
		class := e.Kind.Class()
		var seq int64
		if err := tx.QueryRowContext(ctx, `INSERT INTO events (at, kind, actor, node, message, owner_id, class, seq)
			VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, COALESCE((SELECT MAX(seq) FROM events WHERE class = ?7), 0) + 1) RETURNING seq`,
			unixNano(e.At), string(e.Kind), e.Actor, e.Node, e.Message, e.OwnerID, class).Scan(&seq); err != nil {
			return fmt.Errorf("store: add event: %w", err)
		}
		// Only this class grew; keep exactly its newest MaxEvents.
		if _, err := tx.ExecContext(ctx, `DELETE FROM events WHERE class = ? AND seq <= ?`, class, seq-MaxEvents); err != nil {
			return fmt.Errorf("store: prune events: %w", err)
		}
		return nil
	}
}

// ListEvents implements Store.
func (s *sqlStore) ListEvents(ctx context.Context, ownerID int64, limit int) ([]Event, error) {
	if err := s.events.wait(ctx); err != nil {
		return nil, err
	}
	if limit <= 0 || limit > eventClasses*MaxEvents {
		limit = eventClasses * MaxEvents // every class full
	}
	q := `SELECT id, at, kind, actor, node, message, owner_id FROM events`
	args := []any{}
	if ownerID > 0 {
		q += ` WHERE owner_id = ?`
		args = append(args, ownerID)
	}
	q += ` ORDER BY id DESC LIMIT ?`
	args = append(args, limit)
	return queryAll(ctx, s.db, scanEvent, q, args...)
}

func scanEvent(r scanner) (Event, error) {
	var e Event
	var at int64
	var kind string
	if err := r.Scan(&e.ID, &at, &kind, &e.Actor, &e.Node, &e.Message, &e.OwnerID); err != nil {
		return e, err
	}
	e.At, e.Kind = fromUnixNano(at), EventKind(kind)
	return e, nil
}
