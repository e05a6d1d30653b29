package main

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestDemoHoldsEveryExpectation(t *testing.T) {
	var out, errOut bytes.Buffer
	code := run(context.Background(), []string{"demo"}, &out, &errOut)
	require.Equal(t, 0, code, "stdout:\n%s\nstderr:\n%s", out.String(), errOut.String())
	s := out.String()
	assert.Equal(t, 4, strings.Count(s, "  ok  "), "two allowed flows, the revocation and the drift")
	refused := 8
	if _, err := exec.LookPath("bash"); err == nil {
		refused++ // another executable using an agent's proxy
		assert.Contains(t, s, "workload mismatch")
	}
	assert.Equal(t, refused, strings.Count(s, "REFUSED"))
	assert.Equal(t, refused, strings.Count(s, "delivered 0 B"))
	assert.Contains(t, s, "c revoked itself", "TrustFlow isolates the drifted node")
	assert.Contains(t, s, "found its zone peers by itself", "nodes discover each other by gossip")
	assert.Contains(t, s, "the live flow was cut")
	assert.NotContains(t, s, "FAIL")
	assert.Contains(t, s, "every expectation held")
}
