package web

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"
)

// PolicyView is the access policy as the Policy page shows it.
type PolicyView struct {
	Text      string
	Updated   time.Time
	UpdatedBy string
	// Default: never set; the allow-all policy of a fresh coordinator.
	Default bool
	// Services and Rows are the matrix of who may reach what now.
	Services []string
	Rows     []PolicyRow
}

// PolicyRow is one node's line of the access matrix.
type PolicyRow struct {
	Node  string
	Owner string // user:NAME or tag:NAME
	// OwnerID is the user the node belongs to (who sees the row besides
	// the admins).
	OwnerID int64
	Allow   []bool // by PolicyView.Services
}

// PolicyChange is what setting a policy granted and revoked.
type PolicyChange struct {
	Granted, Revoked []string
}

// PolicyRejected is a policy refused with its problems, one per line;
// the policy in force is unchanged.
type PolicyRejected struct{ Problems string }

func (e *PolicyRejected) Error() string { return e.Problems }

// policyData is the Policy page's part of pageData.
type policyData struct {
	View    PolicyView
	Draft   string // what the admin submitted, kept on a refusal
	Problem string
	Change  *PolicyChange
}

func (c *Console) servePolicy(w http.ResponseWriter, r *http.Request, v *viewer) {
	c.policyPage(w, r, v, http.StatusOK, &policyData{})
}

func (c *Console) policyPage(w http.ResponseWriter, r *http.Request, v *viewer, status int, pd *policyData) {
	pv, err := c.mesh.Policy(r.Context())
	if err != nil {
		c.internal(w, r, "policy", err)
		return
	}
	if !v.Admin {
		// A member sees the rule text (everyone reads it) and the rows
		// of their own nodes.
		rows := pv.Rows[:0:0]
		for _, row := range pv.Rows {
			if row.OwnerID == v.ID {
				rows = append(rows, row)
			}
		}
		pv.Rows = rows
	}
	pd.View = pv
	if pd.Draft == "" {
		pd.Draft = pv.Text
	}
	c.render(w, r, status, "policy", &pageData{Title: "Access policy", Nav: "policy", Viewer: v, Policy: pd})
}

func (c *Console) serveSetPolicy(w http.ResponseWriter, r *http.Request, v *viewer) {
	if !v.Admin {
		c.renderMessage(w, r, v, http.StatusForbidden, "Admins only", "Only an admin changes the access policy.")
		return
	}
	text := strings.ReplaceAll(r.PostFormValue("policy"), "\r\n", "\n")
	ch, err := c.mesh.SetPolicy(r.Context(), text, v.Username)
	var rej *PolicyRejected
	if errors.As(err, &rej) {
		c.policyPage(w, r, v, http.StatusBadRequest, &policyData{Draft: text, Problem: rej.Problems})
		return
	} else if err != nil {
		c.internal(w, r, "set policy", err)
		return
	}
	c.policyPage(w, r, v, http.StatusOK, &policyData{Change: &ch})
}

// policyMesh is the part of Mesh the Policy page needs.
type policyMesh interface {
	// Policy returns the policy in force and the access matrix.
	Policy(ctx context.Context) (PolicyView, error)
	// SetPolicy checks and applies text; a *PolicyRejected says why not.
	SetPolicy(ctx context.Context, text, by string) (PolicyChange, error)
}
