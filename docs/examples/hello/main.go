// Command hello is the complete SDK program of docs/sdk.md: it opens a joined node directory,
// serves HTTP as the agent ledger.payments on port 443 and calls it as billing-api.payments, which
// the example policy (docs/examples/policy.yaml) allows. The server answers with the caller's
// identity as the node verified it from the flow's signed provenance record.
//
//	go build -o /tmp/ute/hello ./docs/examples/hello
//	/tmp/ute/hello --dir /tmp/ute/n1
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/ute-project/ute/node"
)

func main() {
	dir := flag.String("dir", "", "a node directory joined to zone payments with agents ledger and billing-api")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "hello: --dir is required (a directory made by `ute node join`)")
		os.Exit(2)
	}
	if err := run(*dir); err != nil {
		fmt.Fprintln(os.Stderr, "hello:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	// ListenAddr is the node's UDP endpoint for tunnels; a daemon running on the same directory
	// uses its own, so pick a free one.
	n, err := node.Open(ctx, node.Config{Dir: dir, ListenAddr: "127.0.0.1:0"})
	if err != nil {
		return err
	}
	defer n.Close()

	ledger, err := n.Agent("payments", "ledger")
	if err != nil {
		return fmt.Errorf("agent ledger (add it with `ute agent add --zone payments --name ledger`): %w", err)
	}
	l, err := ledger.Listen("tcp", ":443")
	if err != nil {
		return err
	}
	srv := &http.Server{ConnContext: node.ConnContext, Handler: http.HandlerFunc(
		func(w http.ResponseWriter, r *http.Request) {
			p, err := node.WhoIsRequest(r)
			if err != nil {
				http.Error(w, err.Error(), http.StatusForbidden)
				return
			}
			fmt.Fprintf(w, "hello %s (%s) from node %s, trust %d\n", p.Agent, p.SourceIP, p.Node, p.Trust)
		})}
	go func() { _ = srv.Serve(l) }()
	defer srv.Close()

	billing, err := n.Agent("payments", "billing-api")
	if err != nil {
		return fmt.Errorf("agent billing-api (add it with `ute agent add --zone payments --name billing-api`): %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://ledger.payments:443/", nil)
	if err != nil {
		return err
	}
	resp, err := billing.HTTPClient().Do(req)
	if err != nil {
		var refused *node.RefusedError
		if errors.As(err, &refused) {
			return fmt.Errorf("refused at %s: %s: %w", refused.Stage, refused.Reason, err)
		}
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	fmt.Print(string(body))
	return nil
}
