package main

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/identity/authority"
)

func newTokenCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "token",
		Short: "Mint single-use join tokens",
	}
	cmd.AddCommand(newTokenCreateCmd())
	return cmd
}

func newTokenCreateCmd() *cobra.Command {
	var (
		dir     string
		zs      []string
		regions []string
		ttl     time.Duration
		asJSON  bool
	)
	cmd := &cobra.Command{
		Use:   "create --dir D --zone Z [--zone Z2] [--ttl 15m] [--region R]",
		Short: "Create a join token and print it once (works while `ute authority run` is running)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || len(zs) == 0 {
				return usagef("token create needs --dir and at least one --zone")
			}
			if ttl <= 0 || ttl > authority.MaxTokenTTL {
				return usagef("--ttl %s out of range; use a duration between 1s and %s", ttl, authority.MaxTokenTTL)
			}
			adm, err := authority.OpenAdmin(cmd.Context(), dir, authority.Options{})
			if err != nil {
				return err
			}
			defer func() { _ = adm.Close() }()
			tok, err := adm.CreateToken(cmd.Context(), authority.TokenSpec{Zones: zs, Regions: regions, TTL: ttl})
			if err != nil {
				return err
			}
			if asJSON {
				return json.NewEncoder(cmd.OutOrStdout()).Encode(tok)
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok.Token)
			return err
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "authority directory")
	cmd.Flags().StringArrayVar(&zs, "zone", nil, "zone the joining node may hold (repeatable)")
	cmd.Flags().StringArrayVar(&regions, "region", nil, "region the joining node must be in (repeatable)")
	cmd.Flags().DurationVar(&ttl, "ttl", authority.DefaultTokenTTL, "how long the token stays usable")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the token with its id, zones and expiry as JSON")
	return cmd
}
