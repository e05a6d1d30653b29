package authority

import (
	"context"
	"log/slog"
	"time"

	"github.com/ute-project/ute/identity"
)

// NeedsRenewal reports whether cert has reached the half-life of its validity window.
func NeedsRenewal(cert *identity.Certificate, now time.Time) bool {
	return !now.Before(cert.RenewAt())
}

// Renewer keeps a node certificate fresh: it renews at half-life and retries failures with a
// capped backoff. It owns no goroutine; Run blocks until its context ends.
type Renewer struct {
	// Current returns the certificate in use now (it changes after each renewal).
	Current func() (*identity.Certificate, error)
	// Renew performs one renewal and installs its result.
	Renew func(ctx context.Context) error
	// Now and After are the clock; nil means the real one. Tests inject a fake.
	Now   func() time.Time
	After func(time.Duration) <-chan time.Time
	// MinRetry and MaxRetry bound the backoff after a failure (defaults 5 s and 5 min).
	MinRetry, MaxRetry time.Duration
	Logger             *slog.Logger
}

// Run renews whenever the current certificate reaches half-life, until ctx is cancelled. A failed
// renewal is retried with exponential backoff, never later than the backoff cap, because an expired
// node certificate can only be replaced by a new join.
func (r *Renewer) Run(ctx context.Context) error {
	now, after, log := r.Now, r.After, r.Logger
	if now == nil {
		now = time.Now
	}
	if after == nil {
		after = time.After
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	minRetry, maxRetry := r.MinRetry, r.MaxRetry
	if minRetry <= 0 {
		minRetry = 5 * time.Second
	}
	if maxRetry < minRetry {
		maxRetry = max(5*time.Minute, minRetry)
	}
	backoff := minRetry
	for {
		var wait time.Duration
		cert, err := r.Current()
		switch {
		case err != nil:
			log.Error("renewer: read current certificate", "err", err)
			wait, backoff = backoff, min(2*backoff, maxRetry)
		case NeedsRenewal(cert, now()):
			if err := r.Renew(ctx); err != nil {
				if ctx.Err() != nil {
					return nil
				}
				log.Warn("renewal failed; retrying", "node", cert.ID.String(), "not_after", cert.X509.NotAfter, "retry_in", backoff, "err", err)
				wait, backoff = backoff, min(2*backoff, maxRetry)
			} else {
				log.Info("certificate renewed", "node", cert.ID.String())
				backoff = minRetry
				continue
			}
		default:
			wait = cert.RenewAt().Sub(now())
		}
		select {
		case <-ctx.Done():
			return nil
		case <-after(wait):
		}
	}
}
