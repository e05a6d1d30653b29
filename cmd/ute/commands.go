package main

import "github.com/spf13/cobra"

// commands lists the top-level command groups. Each group lives in its own file.
func commands() []*cobra.Command {
	return []*cobra.Command{newPolicyCmd(), newAuthorityCmd(), newTokenCmd(), newNodeCmd(newNodeRunCmd()), newAgentCmd(), newAuditCmd(), newDemoCmd(), newRevokeCmd(), newStatusCmd(), newWhoisCmd(), newTrustCmd(), newSimCmd()}
}
