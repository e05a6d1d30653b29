package authority

import (
	"time"

	"github.com/ute-project/ute/identity"
)

// NeedsRenewal reports whether cert has reached the half-life of its validity window.
func NeedsRenewal(cert *identity.Certificate, now time.Time) bool {
	return !now.Before(cert.RenewAt())
}
