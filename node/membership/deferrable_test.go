package membership

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// recordingTransport is memberlist's in-memory transport, keeping a copy of each packet sent.
type recordingTransport struct {
	*memberlist.MockTransport
	mu   sync.Mutex
	sent [][]byte
}

func (t *recordingTransport) WriteToAddress(b []byte, a memberlist.Address) (time.Time, error) {
	t.mu.Lock()
	t.sent = append(t.sent, bytes.Clone(b))
	t.mu.Unlock()
	return t.MockTransport.WriteToAddress(b, a)
}

func (t *recordingTransport) take() [][]byte {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.sent
	t.sent = nil
	return s
}

// startLists starts n memberlists on one in-memory network, joined to the first, with the given
// gossip and probe intervals; each sends through a recordingTransport.
func startLists(t *testing.T, n int, gossip, probe time.Duration) []*recordingTransport {
	t.Helper()
	net := &memberlist.MockNetwork{}
	// Every transport before any memberlist: MockNetwork's table of transports has no lock.
	var trs []*recordingTransport
	for i := range n {
		trs = append(trs, &recordingTransport{MockTransport: net.NewTransport(fmt.Sprintf("m%d", i))})
	}
	var first string
	for i, tr := range trs {
		name := fmt.Sprintf("m%d", i)
		conf := memberlist.DefaultLocalConfig()
		conf.Name = name
		conf.Transport = tr
		conf.GossipInterval = gossip
		conf.ProbeInterval = probe
		conf.ProbeTimeout = min(probe, 200*time.Millisecond)
		conf.PushPullInterval = time.Hour
		conf.EnableCompression = false // as the pools run it (newPool)
		conf.Logger = log.New(io.Discard, "", 0)
		conf.LogOutput = nil
		ml, err := memberlist.Create(conf)
		require.NoError(t, err)
		t.Cleanup(func() { _ = ml.Shutdown() })
		if i == 0 {
			first = tr.FinalAddr()
		} else {
			_, err := ml.Join([]string{first})
			require.NoError(t, err)
		}
	}
	return trs
}

// FinalAddr is the address the in-memory transport advertises.
func (t *recordingTransport) FinalAddr() string {
	ip, port, _ := t.FinalAdvertiseAddr("", 0)
	return fmt.Sprintf("%s:%d", ip, port)
}

// memberState is checked against packets real memberlists send: with probes off, a joining
// zone's packets are its gossip rounds, all member state (alive messages, single and compound);
// with gossip rounds off, its packets are probes and acks, with member state piggybacked or not,
// and none is.
func TestMemberStateOnMemberlistsPackets(t *testing.T) {
	gossipOnly := startLists(t, 8, 20*time.Millisecond, time.Hour)
	var got [][]byte
	require.Eventually(t, func() bool {
		for _, tr := range gossipOnly {
			got = append(got, tr.take()...)
		}
		return len(got) >= 12
	}, 10*time.Second, 20*time.Millisecond)
	compound := 0
	for _, p := range got {
		assert.True(t, memberState(p), "gossip round packet %x", p[:min(len(p), 16)])
		if m := message(p); len(m) > 0 && m[0] == mlCompound {
			compound++
		}
	}
	// Whether a round batches several messages depends on timing; TestMemberState covers compounds.
	t.Logf("%d of %d gossip packets were compounds", compound, len(got))

	probeOnly := startLists(t, 4, time.Hour, 50*time.Millisecond)
	got = nil
	require.Eventually(t, func() bool {
		for _, tr := range probeOnly {
			got = append(got, tr.take()...)
		}
		return len(got) >= 20
	}, 10*time.Second, 20*time.Millisecond)
	for _, p := range got {
		assert.False(t, memberState(p), "probe packet %x", p[:min(len(p), 16)])
	}
}

func TestMemberState(t *testing.T) {
	crc := func(b ...byte) []byte { return append([]byte{mlHasCRC, 1, 2, 3, 4}, b...) }
	compound := func(parts ...[]byte) []byte {
		b := []byte{mlCompound, byte(len(parts))}
		for _, p := range parts {
			b = append(b, byte(len(p)>>8), byte(len(p)))
		}
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	alive, suspect, dead := []byte{mlAlive, 0x80}, []byte{mlSuspect, 0x80}, []byte{mlDead, 0x80}
	ping, ack := []byte{0, 0x80}, []byte{2, 0x80}
	for _, tc := range []struct {
		name string
		b    []byte
		want bool
	}{
		{"alive", alive, true},
		{"suspect with crc", crc(suspect...), true},
		{"dead with label and crc", append([]byte{mlHasLabel, 2, 'z', 'z'}, crc(dead...)...), true},
		{"compound of member state", compound(alive, suspect, dead), true},
		{"compound with crc", crc(compound(alive, alive)...), true},
		{"ping", ping, false},
		{"ping with member state piggybacked", compound(ping, alive), false},
		{"ack", crc(ack...), false},
		{"member state then ack", compound(alive, ack), false},
		{"record", userMessage([]byte{msgRecord, 1}), false},
		{"empty", nil, false},
		{"crc only", []byte{mlHasCRC, 1, 2, 3, 4}, false},
		{"label past the end", []byte{mlHasLabel, 9, 'z'}, false},
		{"compound of none", []byte{mlCompound, 0}, false},
		{"compound lengths cut", []byte{mlCompound, 2, 0, 2}, false},
		{"compound part past the end", append([]byte{mlCompound, 1, 0, 9}, alive...), false},
		{"compound empty part", []byte{mlCompound, 1, 0, 0}, false},
	} {
		t.Run(tc.name, func(t *testing.T) { assert.Equal(t, tc.want, memberState(tc.b)) })
	}
	// A gossip round's record packet is deferrable too; memberlist's own packets only as above.
	assert.True(t, deferrable(userMessage(encodeMessage([]byte("rec")))))
	assert.False(t, deferrable(userMessage([]byte{msgRecord + 1})))
	assert.False(t, deferrable(compound(ping, alive)))
	assert.True(t, deferrable(compound(alive, dead)))
}

func FuzzMemberState(f *testing.F) {
	f.Add([]byte{mlAlive})
	f.Add([]byte{mlCompound, 2, 0, 1, 0, 1, mlAlive, mlDead})
	f.Add([]byte{mlHasLabel, 1, 'z', mlHasCRC, 0, 0, 0, 0, mlSuspect})
	f.Fuzz(func(t *testing.T, b []byte) { _ = memberState(b) })
}
