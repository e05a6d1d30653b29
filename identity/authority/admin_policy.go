package authority

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"

	"github.com/ute-project/ute/zones"
)

// `ute policy apply` through the admin socket: the daemon holds the store, so it signs and stores
// the release and pushes it to its watchers itself.

const pathPolicy = "/v1/policy"

// ApplyPolicyRequest is the admin API's policy apply request.
type ApplyPolicyRequest struct {
	// Name is the file the policy came from, used in errors ("FILE:LINE: ...").
	Name string `json:"name"`
	// Policy is the policy YAML.
	Policy []byte `json:"policy"`
}

// maxAdminPolicyBody bounds an apply request: the policy (base64 in JSON) and its name.
const maxAdminPolicyBody = zones.MaxPolicySize*4/3 + 4096

func (l localAdmin) ApplyPolicy(ctx context.Context, name string, policy []byte) (PolicyApplied, error) {
	return l.a.ApplyPolicy(ctx, name, policy)
}

func (c *adminClient) ApplyPolicy(ctx context.Context, name string, policy []byte) (PolicyApplied, error) {
	var out PolicyApplied
	err := c.do(ctx, http.MethodPost, pathPolicy, ApplyPolicyRequest{Name: name, Policy: policy}, &out)
	return out, err
}

func (a *Authority) handleApplyPolicy(w http.ResponseWriter, r *http.Request) {
	var req ApplyPolicyRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminPolicyBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, adminError{"decode policy request: " + err.Error()})
		return
	}
	if req.Name == "" {
		req.Name = "policy"
	}
	out, err := a.ApplyPolicy(r.Context(), req.Name, req.Policy)
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, ErrPolicyInvalid) {
			status = http.StatusBadRequest
		}
		writeJSON(w, status, adminError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, out)
}
