package main

import (
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ute-project/ute/sim"
	"github.com/ute-project/ute/sim/scenario"
	"github.com/ute-project/ute/sim/scenarios"
)

func newSimCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "sim", Short: "Run simulated topologies and attack scenarios over real node code"}
	var (
		seed     uint64
		asJSON   bool
		report   string
		maxNodes int
		realUDP  bool
		dilation int
	)
	run := &cobra.Command{
		Use:   "run [SCENARIO.yaml | NAME]",
		Short: "Run a scenario (a file, or the name of a shipped one); without one, run every shipped scenario",
		Long: "Runs an authority and real node daemons in this process over an in-memory network, plays the\n" +
			"scenario's timeline and checks each expectation. Exit 1 if any expectation fails.\n" +
			"Shipped scenarios: " + strings.Join(shippedNames(), ", ") + ".",
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if cmd.Flags().Changed("dilation") && (dilation < 1 || dilation > scenario.MaxDilation) {
				return usagef("--dilation %d: a whole factor from 1 (none) to %d", dilation, scenario.MaxDilation)
			}
			var scs []*scenario.Scenario
			if len(args) == 1 {
				sc, err := loadScenario(args[0])
				if err != nil {
					return err
				}
				scs = append(scs, sc)
			} else {
				if report != "" {
					return usagef("--report writes one scenario's page: name the scenario")
				}
				for _, name := range shippedNames() {
					sc, err := loadScenario(name)
					if err != nil {
						return err
					}
					// The large scenarios take minutes and gigabytes: only by name, or scaled.
					if n := sc.NodeCount(); maxNodes == 0 && n > allScenariosMaxNodes {
						fmt.Fprintf(cmd.ErrOrStderr(), "skipping %s (%d nodes): run it by name, or add --max-nodes\n", name, n)
						continue
					}
					scs = append(scs, sc)
				}
			}
			// This process runs the simulation: it takes the schedulers a simulation wants.
			runtime.GOMAXPROCS(sim.Procs())
			out := cmd.OutOrStdout()
			var progress io.Writer = cmd.ErrOrStderr()
			if asJSON {
				progress = nil
			}
			var results []*sim.Result
			failed := 0
			for _, sc := range scs {
				res, err := sim.Run(cmd.Context(), sc, sim.Options{Seed: seed, MaxNodes: maxNodes, Progress: progress, Real: realUDP, Dilation: dilation})
				if err != nil {
					return fmt.Errorf("sim %s: %w", sc.Name, err)
				}
				results = append(results, res)
				failed += res.Failed
				if !asJSON {
					if err := sim.WriteTable(out, res); err != nil {
						return err
					}
				}
				if report != "" {
					if err := writeReport(report, res); err != nil {
						return err
					}
					if !asJSON {
						fmt.Fprintf(out, "report written to %s\n", report)
					}
				}
			}
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				var v any = results
				if len(args) == 1 {
					v = results[0]
				}
				if err := enc.Encode(v); err != nil {
					return err
				}
			}
			if failed > 0 {
				return fmt.Errorf("sim: %d expectation(s) failed", failed)
			}
			return nil
		},
	}
	run.Flags().Uint64Var(&seed, "seed", 0, "seed of the network's loss and jitter (default: the scenario's)")
	run.Flags().BoolVar(&asJSON, "json", false, "print the results as JSON instead of a table")
	run.Flags().StringVar(&report, "report", "", "write a self-contained HTML report to this file")
	run.Flags().IntVar(&maxNodes, "max-nodes", 0, "scale the node groups down to at most this many nodes")
	run.Flags().BoolVar(&realUDP, "real", false, fmt.Sprintf("run over real UDP sockets on 127.0.0.1 instead of the in-memory network (at most %d nodes; link latency, jitter and loss do not apply)", sim.MaxRealNodes))
	run.Flags().IntVar(&dilation, "dilation", 0, "run every timer the simulator reaches this many times slower and report measured times divided by it (default: the scenario's dilation)")
	cmd.AddCommand(run)
	return cmd
}

// allScenariosMaxNodes is the largest shipped scenario `ute sim run` without a name runs as is.
const allScenariosMaxNodes = 100

// shippedNames lists the scenarios built into the binary.
func shippedNames() []string {
	var names []string
	entries, _ := fs.ReadDir(scenarios.FS, ".")
	for _, e := range entries {
		if n, ok := strings.CutSuffix(e.Name(), ".yaml"); ok {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names
}

// loadScenario reads a scenario file, or a shipped scenario by name when no such file exists.
func loadScenario(arg string) (*scenario.Scenario, error) {
	if _, err := os.Stat(arg); err == nil || strings.ContainsAny(arg, "/.") {
		return scenario.Load(arg)
	}
	data, err := fs.ReadFile(scenarios.FS, arg+".yaml")
	if err != nil {
		return nil, usagef("no scenario file %q and no shipped scenario of that name (shipped: %s)", arg, strings.Join(shippedNames(), ", "))
	}
	return scenario.Parse(path.Join("sim/scenarios", arg+".yaml"), data)
}

func writeReport(file string, res *sim.Result) error {
	f, err := os.Create(file)
	if err != nil {
		return fmt.Errorf("sim: report: %w", err)
	}
	if err := sim.WriteHTML(f, res); err != nil {
		_ = f.Close()
		return fmt.Errorf("sim: report %s: %w", file, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("sim: report %s: %w", file, err)
	}
	return nil
}
