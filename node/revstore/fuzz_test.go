package revstore

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzDecodeStored feeds arbitrary stored values (a damaged or hostile file) to the decoder: it
// must refuse with ErrCorrupt or return a non-empty record, never panic.
func FuzzDecodeStored(f *testing.F) {
	good, err := encMode.Marshal(stored{Raw: []byte{0xd2, 0x84}, Arrived: 1767225600123})
	require.NoError(f, err)
	f.Add(good)
	f.Add([]byte{0xa0})
	f.Add([]byte{0xa1, 0x01, 0x40})
	f.Add([]byte{0xff, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := decodeStored(b)
		if err != nil {
			require.ErrorIs(t, err, ErrCorrupt)
			return
		}
		require.NotEmpty(t, st.Raw)
	})
}
