package membership

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func pickCands(n int) []Member {
	out := make([]Member, n)
	for i := range out {
		out[i] = Member{NodeID: fmt.Sprintf("m-%04d", i)}
	}
	return out
}

func TestPickMembers(t *testing.T) {
	in := func(set map[string]bool) func(string) bool { return func(id string) bool { return set[id] } }
	live := map[string]bool{"m-0003": true, "m-0010": true, "m-0042": true, "m-0077": true}
	held := map[string]bool{"m-0010": true, "m-0005": true, "m-0006": true}
	for range 200 {
		got := pickMembers(pickCands(100), 3, in(held), in(live))
		require.Len(t, got, 3)
		ids := map[string]bool{}
		lives := 0
		for _, m := range got {
			assert.False(t, held[m.NodeID], "a member the transport holds back is never picked")
			assert.False(t, ids[m.NodeID], "picked twice: %s", m.NodeID)
			ids[m.NodeID] = true
			if live[m.NodeID] {
				lives++
			}
		}
		// Three live, unheld members exist: k−1 = 2 of the picks are among them (the random
		// third may be one too).
		assert.GreaterOrEqual(t, lives, 2)
	}

	t.Run("fewer candidates than k", func(t *testing.T) {
		got := pickMembers(pickCands(4), 6, in(map[string]bool{"m-0001": true}), in(nil))
		assert.ElementsMatch(t, []Member{{NodeID: "m-0000"}, {NodeID: "m-0002"}, {NodeID: "m-0003"}}, got)
		assert.Empty(t, pickMembers(pickCands(4), 0, in(nil), in(nil)))
		assert.Empty(t, pickMembers(nil, 3, in(nil), in(nil)))
	})

	t.Run("every candidate can be the random pick", func(t *testing.T) {
		seen := map[string]int{}
		for range 3000 {
			for _, m := range pickMembers(pickCands(20), 2, in(nil), in(live)) {
				seen[m.NodeID]++
			}
		}
		assert.Len(t, seen, 20, "a member that is never drawn would never hear a record from this node")
	})

	t.Run("looks at few candidates when live tunnels abound", func(t *testing.T) {
		looks := 0
		count := func(string) bool { looks++; return false }
		all := func(string) bool { return true }
		got := pickMembers(pickCands(1000), 3, count, all)
		require.Len(t, got, 3)
		// Before, every candidate was asked about (1,000 lookups, each under the transport's lock).
		assert.LessOrEqual(t, looks, 3)
	})
}
