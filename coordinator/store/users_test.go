package store

import (
	"context"
	"errors"
	"testing"
)

// TestDeleteUser: removing a user revokes exactly their live tokens and
// ends their sessions; the last admin stays.
func TestDeleteUser(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		s := open(t, Options{})
		admin, _ := s.CreateUser(ctx, User{Username: "admin", PasswordHash: "x", Admin: true})
		alice, _ := s.CreateUser(ctx, User{Username: "alice", PasswordHash: "x"})
		for id, owner := range map[string]int64{"a1": alice.ID, "a2": alice.ID, "root": admin.ID} {
			if err := s.CreateToken(ctx, Token{ID: id, SecretHash: HashSecret(id), OwnerID: owner}); err != nil {
				t.Fatal(err)
			}
		}
		s.RevokeToken(ctx, "a2") // already revoked: not reported again
		if err := s.CreateSession(ctx, Session{IDHash: HashSecret("sess"), UserID: alice.ID, CSRF: "c", Expires: alice.Created.AddDate(1, 0, 0)}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.DeleteUser(ctx, admin.ID); !errors.Is(err, ErrLastAdmin) {
			t.Fatalf("deleting the last admin: %v", err)
		}
		revoked, err := s.DeleteUser(ctx, alice.ID)
		if err != nil || len(revoked) != 1 || revoked[0] != "a1" {
			t.Fatalf("DeleteUser: %v %v", revoked, err)
		}
		if tok, _ := s.GetToken(ctx, "a1"); !tok.Revoked {
			t.Fatal("alice's token still valid")
		}
		if tok, _ := s.GetToken(ctx, "root"); tok.Revoked {
			t.Fatal("the admin's token was revoked")
		}
		if _, err := s.GetSession(ctx, HashSecret("sess"), alice.Created); !errors.Is(err, ErrNotFound) {
			t.Fatalf("alice's session: %v", err)
		}
		if _, err := s.GetUser(ctx, "alice"); !errors.Is(err, ErrNotFound) {
			t.Fatalf("alice: %v", err)
		}
		if _, err := s.DeleteUser(ctx, alice.ID); !errors.Is(err, ErrNotFound) {
			t.Fatalf("deleting alice twice: %v", err)
		}
	})
}

func TestApproveUser(t *testing.T) {
	eachStore(t, func(t *testing.T, be backend, open opener) {
		ctx := context.Background()
		s := open(t, Options{})
		u, _ := s.CreateUser(ctx, User{Username: "oidc:x#1", PasswordHash: "!", Pending: true})
		if got, _ := s.GetUser(ctx, u.Username); !got.Pending {
			t.Fatal("pending not stored")
		}
		if err := s.ApproveUser(ctx, u.ID); err != nil {
			t.Fatal(err)
		}
		if got, _ := s.GetUserByID(ctx, u.ID); got.Pending {
			t.Fatal("still pending after approval")
		}
		if err := s.ApproveUser(ctx, 999); !errors.Is(err, ErrNotFound) {
			t.Fatalf("approving nobody: %v", err)
		}
	})
}
