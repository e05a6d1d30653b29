package localapi

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTrustExplainRoundTrip(t *testing.T) {
	fb := &fakeBackend{}
	_, path := start(t, fb, Options{})
	c := dial(t, path)
	subject := testStat.Trust[0].Subject
	x, err := c.TrustExplain(context.Background(), subject)
	require.NoError(t, err)
	assert.Equal(t, 90, x.Score)
	assert.Equal(t, "policy_denial", x.Events[0].Kind)
	assert.Equal(t, []any{subject}, fb.seen)
	_, err = c.TrustExplain(context.Background(), "billing&x=1")
	require.ErrorIs(t, err, ErrBadRequest, "the subject travels escaped, whole")
	assert.Equal(t, []any{subject, "billing&x=1"}, fb.seen)

	resp, err := rawClient(path).Get("http://ute" + PathTrust + "?subject=" + subject)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	for _, k := range []string{`"score":90`, `"min_trust":50`, `"isolate_below":20`, `"penalty_after":10`, `"steps":[`, `"decay_per_hour":10`} {
		assert.Contains(t, string(body), k)
	}
}

func TestTrustExplainMalformed(t *testing.T) {
	fb := &fakeBackend{}
	_, path := start(t, fb, Options{})
	hc := rawClient(path)
	for _, q := range []string{"", "?subject=", "?subject=a&subject=b", "?subject=a&x=1", "?subject=a%0Ab",
		"?subject=" + strings.Repeat("a", maxSubjectLen+1), "?subject=%ff"} {
		resp, err := hc.Get("http://ute" + PathTrust + q)
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		_ = resp.Body.Close()
		assert.Equal(t, http.StatusBadRequest, resp.StatusCode, "%s: %s", q, body)
		assert.Contains(t, string(body), `"code":"`+CodeBadRequest+`"`)
	}
	assert.Zero(t, fb.calls.Load(), "no malformed request reached the Backend")
}
