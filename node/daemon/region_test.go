package daemon

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The region file is stat'ed every trust tick and read only when it changed; every kind of change
// is still seen at the next call: an in-place rewrite of the same length right after a read (same
// inode and size, and a file time that may not have moved), an atomic rename, an emptied file and
// a removed one.
func TestRegionFileSeesEveryChange(t *testing.T) {
	path := filepath.Join(t.TempDir(), FileRegion)
	var r regionFile
	assert.Empty(t, r.read(path), "no file")

	require.NoError(t, os.WriteFile(path, []byte("eu-west-1\nignored\n"), 0o644))
	assert.Equal(t, "eu-west-1", r.read(path))
	assert.Equal(t, "eu-west-1", r.read(path), "unchanged")
	require.NoError(t, os.WriteFile(path, []byte("us-east-1\nignored\n"), 0o644))
	assert.Equal(t, "us-east-1", r.read(path), "rewritten in place, same length, at once")

	tmp := path + ".new"
	require.NoError(t, os.WriteFile(tmp, []byte("  ap-south-1  \n"), 0o644))
	require.NoError(t, os.Rename(tmp, path))
	assert.Equal(t, "ap-south-1", r.read(path), "replaced by rename")

	require.NoError(t, os.WriteFile(path, nil, 0o644))
	assert.Empty(t, r.read(path), "emptied")
	require.NoError(t, os.WriteFile(path, []byte("eu-west-1\n"), 0o644))
	assert.Equal(t, "eu-west-1", r.read(path))
	require.NoError(t, os.Remove(path))
	assert.Empty(t, r.read(path), "removed")
}
