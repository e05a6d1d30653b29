//go:build !race

package membership

import "time"

// heldWithin: see race_on_test.go.
const heldWithin = time.Second
