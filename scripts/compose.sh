#!/usr/bin/env bash
# Containers for the compose test (tests/compose.rs), with podman from Debian: no Docker engine
# and no image registry are needed (../shared/CONTAINERS.md has the measurements behind this).
#
#   scripts/compose.sh install   podman, runc, debootstrap (apt), podman-compose (PyPI, pinned
#                                and hash-checked), the engine settings this sandbox needs, and
#                                the base images; proves a container runs. Last stdout line: the
#                                folder holding containers.conf and bin/podman-compose.
#                                Exit 3: containers cannot run on this machine (the reason is on
#                                stderr and in that folder's `unavailable`); the test then skips.
#   scripts/compose.sh image BIN the image docker-compose.yml runs (fracture:local): the
#                                Dockerfile's own runtime stage around BIN, a fracture binary
#                                built on this host (Debian 12, the runtime's glibc), so the test
#                                does not compile the workspace a second time in a container.
#   scripts/compose.sh env       the environment for podman and podman-compose, as shell exports.
#   scripts/compose.sh checker   builds scripts/compose/config once: container-check, which
#                                reads docker-compose.yml with compose-go (Docker Compose's own
#                                loader) and the Dockerfile with BuildKit's `docker build --check`,
#                                pinned in its go.mod and go.sum; last stdout line: the binary.
#                                Needs Go, not root, podman or a registry.
#
# Base images, built only where an image of that name is missing (a registry's wins):
#   docker.io/library/debian:bookworm-slim   debootstrap --variant=minbase of Debian 12 from the
#                                            mirror apt already uses (Release files verified
#                                            against Debian's archive keyring)
#   docker.io/apache/kafka:4.1.0             scripts/compose/kafka: a stand-in made of the Kafka
#                                            jars scripts/kafka.sh fetches, on that Debian
# Needs root (rootful podman; apt). Everything else stays under $FRACTURE_CACHE/compose.
#   FRACTURE_CACHE   cache folder (default $HOME/.cache/fracture)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
DIR="$CACHE/compose"
PODMAN_COMPOSE_VERSION=1.6.0
# podman-compose and what it imports, for CPython 3.11 on x86_64 (Debian 12's).
PINS=(
  "podman-compose==$PODMAN_COMPOSE_VERSION --hash=sha256:98e48af25d44c10ecef948163bfcca002e32aa8bbb7e66593fbd4faff7270c30"
  "python-dotenv==1.2.4 --hash=sha256:42269a8a5b3fd54ffa6f3d84b18abed50064717576b4ecf03dc4a55d8aa04fdc"
  "pyyaml==6.0.4 --hash=sha256:622aa875fa6533f25fedcffe23079357d65a690d462200afed5d8e9d0e01ebee"
)
PACKAGES=(podman runc debootstrap netavark aardvark-dns containernetworking-plugins slirp4netns
  fuse-overlayfs uidmap iptables)
DEBIAN_IMAGE=docker.io/library/debian:bookworm-slim
KAFKA_IMAGE=docker.io/apache/kafka:4.1.0

say() { echo "compose.sh: $*" >&2; }
die() { say "$*"; exit 1; }
unavailable() {
  mkdir -p "$DIR"
  printf '%s\n' "$*" >"$DIR/unavailable"
  say "containers cannot run here: $*"
  exit 3
}

env_exports() {
  echo "export CONTAINERS_CONF=$DIR/containers.conf"
  echo "export PATH=$DIR/bin:\$PATH"
}

# crun cannot set rlimits without CAP_SYS_RESOURCE and does not run on hybrid cgroups; podman's
# default nofile (1048576) is above this sandbox's hard limit; there is no systemd for the
# default cgroup manager or events log.
write_conf() {
  local nofile nproc
  nofile=$(ulimit -Hn)
  [[ "$nofile" == unlimited || "$nofile" -gt 20000 ]] && nofile=20000
  nproc=32768
  cat >"$DIR/containers.conf" <<EOF
# Written by scripts/compose.sh: rootful podman in a sandbox without systemd or CAP_SYS_RESOURCE.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
}

install_packages() {
  local need=() p
  for p in "${PACKAGES[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  [[ ${#need[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || unavailable "podman is not installed and installing it needs root (apt-get install ${need[*]})"
  command -v apt-get >/dev/null || unavailable "no apt-get to install ${need[*]}"
  say "installing ${need[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 ||
    die "apt-get install ${need[*]} failed"
}

install_compose() {
  local venv="$DIR/venv" want="$PODMAN_COMPOSE_VERSION"
  if [[ "$(cat "$venv/pinned" 2>/dev/null)" != "$want" ]]; then
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    local req="$venv/requirements.txt"
    printf '%s\n' "${PINS[@]}" >"$req"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
      --require-hashes --only-binary=:all: -r "$req" >&2 || die "pip could not install podman-compose $want"
    echo "$want" >"$venv/pinned"
  fi
  mkdir -p "$DIR/bin"
  ln -sf "$venv/bin/podman-compose" "$DIR/bin/podman-compose"
}

mirror() {
  local m
  m=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1)
  [[ -n "$m" ]] || m=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1)
  echo "${m:-http://deb.debian.org/debian}"
}

debian_image() {
  podman image exists "$DEBIAN_IMAGE" && return 0
  local rootfs
  rootfs="$(mktemp -d "${TMPDIR:-/tmp}/fracture-rootfs.XXXXXX")"
  say "debootstrap of Debian 12 (minbase) from $(mirror) for $DEBIAN_IMAGE"
  debootstrap --variant=minbase bookworm "$rootfs" "$(mirror)" >"$DIR/debootstrap.log" 2>&1 || {
    tail -n 20 "$DIR/debootstrap.log" >&2
    rm -rf "$rootfs"
    die "debootstrap failed (log: $DIR/debootstrap.log)"
  }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import --change 'CMD ["bash"]' - "$DEBIAN_IMAGE" >&2
  rm -rf "$rootfs"
}

kafka_image() {
  podman image exists "$KAFKA_IMAGE" && return 0
  local libs ctx
  libs="$(bash "$root/scripts/kafka.sh" install | tail -n 1)"
  ctx="$(mktemp -d "${TMPDIR:-/tmp}/fracture-kafka-image.XXXXXX")"
  cp -a "$root/scripts/compose/kafka/." "$ctx/"
  cp -a "$libs" "$ctx/libs"
  say "building the stand-in $KAFKA_IMAGE"
  podman build --pull=never -t "$KAFKA_IMAGE" "$ctx" >"$DIR/kafka-image.log" 2>&1 || {
    tail -n 20 "$DIR/kafka-image.log" >&2
    rm -rf "$ctx"
    die "building $KAFKA_IMAGE failed (log: $DIR/kafka-image.log)"
  }
  rm -rf "$ctx"
}

cmd_install() {
  mkdir -p "$DIR"
  rm -f "$DIR/unavailable"
  install_packages
  write_conf
  install_compose
  export CONTAINERS_CONF="$DIR/containers.conf"
  podman info >/dev/null 2>"$DIR/podman-info.err" || unavailable "podman info: $(tail -n 3 "$DIR/podman-info.err")"
  exec 9>"$CACHE/compose.lock"
  flock 9
  debian_image
  # A container that starts and exits is what the sandbox may refuse (rlimits, cgroups).
  podman run --rm --pull=never --network none "$DEBIAN_IMAGE" true 2>"$DIR/probe.err" ||
    unavailable "podman run: $(tail -n 3 "$DIR/probe.err")"
  kafka_image
  exec 9>&-
  echo "$DIR"
}

# The runtime stage of the Dockerfile, verbatim but for where the binary comes from.
cmd_image() {
  local bin="${1:?usage: scripts/compose.sh image BIN}" ctx tag=fracture:local
  [[ -x "$bin" ]] || die "$bin is not an executable"
  export CONTAINERS_CONF="$DIR/containers.conf"
  ctx="$(mktemp -d "${TMPDIR:-/tmp}/fracture-image.XXXXXX")"
  trap 'rm -rf "$ctx"' RETURN
  mkdir -p "$ctx/out/usr/local/bin" "$ctx/out/usr/share/fracture/models"
  # Debug symbols are most of a test binary's size and nothing a container needs.
  objcopy --strip-debug "$bin" "$ctx/out/usr/local/bin/fracture"
  cp -r "$root/models/demo" "$root/models/untrained" "$root/models/null" "$ctx/out/usr/share/fracture/models/"
  # The global ARGs (before the first FROM) and the runtime stage.
  awk '/^FROM / { seen = 1 } /^ARG / && !seen; /^FROM .* AS runtime$/ { on = 1 } on' "$root/Dockerfile" |
    sed 's|^COPY --from=builder /out/ /$|COPY out/ /|' >"$ctx/Containerfile"
  grep -q '^FROM .* AS runtime$' "$ctx/Containerfile" || die "Dockerfile has no 'FROM … AS runtime' stage"
  grep -q '^COPY out/ /$' "$ctx/Containerfile" || die "the Dockerfile's runtime stage no longer copies /out/ from the builder"
  podman build --pull=never -t "$tag" "$ctx" >"$DIR/fracture-image.log" 2>&1 || {
    tail -n 20 "$DIR/fracture-image.log" >&2
    die "building $tag failed (log: $DIR/fracture-image.log)"
  }
  # The image this replaced, now untagged, would pile up with every test run.
  podman image prune -f >/dev/null 2>&1 || true
  echo "$tag"
}

# Rebuilt when its sources change (the stamp is their sha256).
cmd_checker() {
  local src="$root/scripts/compose/config" bin="$DIR/bin/container-check" want
  want=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -d' ' -f1)
  if [[ ! -x "$bin" || "$(cat "$bin.stamp" 2>/dev/null)" != "$want" ]]; then
    command -v go >/dev/null || die "building container-check needs Go >= 1.24.3 on PATH (https://go.dev/dl/)"
    mkdir -p "$DIR/bin"
    say "building container-check (compose-go, BuildKit's Dockerfile checks) into $bin"
    (
      cd "$src"
      export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/cache" GOFLAGS=-mod=readonly
      go build -trimpath -o "$bin" .
    ) >&2 || die "go build of scripts/compose/config failed"
    echo "$want" >"$bin.stamp"
  fi
  echo "$bin"
}

case "${1:-}" in
install) cmd_install ;;
checker) cmd_checker ;;
image) shift; cmd_image "$@" ;;
env) env_exports ;;
*) die "usage: scripts/compose.sh install | image BIN | env | checker" ;;
esac
