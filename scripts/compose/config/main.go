// container-check: the container files as Docker itself reads them, for tests/compose.rs and
// tests/dockerfile.rs (no engine, no registry, no network).
//
//	container-check compose FILE [PROFILE...]
//	    The compose file loaded by compose-go, Docker Compose's own loader (schema, merge keys,
//	    interpolation, normalisation), printed as the JSON model Docker Compose would run.
//	container-check dockerfile FILE
//	    The Dockerfile through BuildKit's own `docker build --check` (parser, instruction
//	    checks, lint rules, stage graph), printed as its JSON lint results. Base images resolve
//	    to an empty local config: this reads the file, it does not fetch or build anything.
//
// A file either refuses exits 1 with the loader's message.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	digest "github.com/opencontainers/go-digest"
)

func fail(err error) {
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}

func compose(file string, profiles []string) {
	opts, err := cli.NewProjectOptions(
		[]string{file},
		cli.WithOsEnv,
		cli.WithWorkingDirectory("."),
		cli.WithProfiles(profiles),
		cli.WithConsistency(true),
		cli.WithNormalization(true),
		cli.WithInterpolation(true),
		cli.WithResolvedPaths(true),
	)
	if err != nil {
		fail(err)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fail(err)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(append(out, '\n'))
}

// Every base image is an empty linux/amd64 image: no registry is asked.
type localImages struct{}

func (localImages) ResolveImageConfig(ctx context.Context, ref string, opt sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	config := []byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}`)
	return ref, digest.FromBytes(config), config, nil
}

func dockerfile(file string) {
	dt, err := os.ReadFile(file)
	if err != nil {
		fail(err)
	}
	ctx := context.Background()
	src := llb.Scratch()
	def, err := src.Marshal(ctx)
	if err != nil {
		fail(err)
	}
	sm := llb.NewSourceMap(&src, file, "Dockerfile", dt)
	sm.Definition = def
	res, err := dockerfile2llb.DockerfileLint(ctx, dt, dockerfile2llb.ConvertOpt{
		SourceMap:    sm,
		MetaResolver: localImages{},
	})
	if err != nil {
		fail(err)
	}
	res.Sources = nil
	out, err := json.Marshal(res)
	if err != nil {
		fail(err)
	}
	os.Stdout.Write(append(out, '\n'))
}

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: container-check compose FILE [PROFILE...] | dockerfile FILE")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "compose":
		compose(os.Args[2], os.Args[3:])
	case "dockerfile":
		dockerfile(os.Args[2])
	default:
		fmt.Fprintln(os.Stderr, "usage: container-check compose FILE [PROFILE...] | dockerfile FILE")
		os.Exit(2)
	}
}
