package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity/authority"
)

// withAdmin runs one operation against the authority in dir — through the admin socket of its
// running daemon, or on its store when none runs (waiting up to lockTimeout for the store's lock)
// — and prints the result: as JSON with asJSON, else as the line text returns.
func withAdmin[T any](cmd *cobra.Command, dir string, lockTimeout time.Duration, asJSON bool,
	op func(context.Context, authority.Admin) (T, error), text func(T) string) error {
	adm, err := authority.OpenAdmin(cmd.Context(), dir, authority.Options{StoreTimeout: lockTimeout})
	if err != nil {
		return err
	}
	defer func() { _ = adm.Close() }()
	res, err := op(cmd.Context(), adm)
	if err != nil {
		return err
	}
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(res)
	}
	_, err = fmt.Fprint(cmd.OutOrStdout(), text(res))
	return err
}
