// compose-config: a compose file read by compose-go, the loader Docker Compose itself uses
// (schema validation, merge keys, interpolation, normalisation), printed as the JSON model Docker
// Compose would run; a file it refuses exits 1 with its message. For tests/compose.rs.
//
//	compose-config FILE [PROFILE...]
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-config FILE [PROFILE...]")
		os.Exit(2)
	}
	opts, err := cli.NewProjectOptions(
		[]string{os.Args[1]},
		cli.WithOsEnv,
		cli.WithWorkingDirectory("."),
		cli.WithProfiles(os.Args[2:]),
		cli.WithConsistency(true),
		cli.WithNormalization(true),
		cli.WithInterpolation(true),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(append(out, '\n'))
}
