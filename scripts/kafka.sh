#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft, single node, loopback) assembled from Maven Central jars.
# No Docker and no apache.org download needed: Java 17+, Maven 3.6.3+ and python3.
#
# Usage:
#   scripts/kafka.sh install
#       Download the broker jars once into $FRACTURE_CACHE/kafka-<version>/libs (later runs are
#       offline and instant). Prints the libs folder.
#   scripts/kafka.sh start DIR [--watch-pid PID]
#       Install if needed, configure, format and start a broker whose files all live in DIR
#       (server.properties, log4j2.xml, data/, kafka.log, kafka.pid, bootstrap). Waits until it
#       accepts connections and prints its bootstrap address (127.0.0.1:PORT) as the last line
#       of stdout; diagnostics go to stderr. Restarting in the same DIR reuses the ports when they
#       are still free, and the data. If the broker of DIR is already running, prints its address.
#       --watch-pid PID: a detached watchdog stops the broker once process PID has exited, so a
#       test binary that starts a broker cannot leak it.
#   scripts/kafka.sh stop DIR
#       SIGTERM (controlled shutdown), SIGKILL after 15 s. Succeeds when nothing runs.
#   scripts/kafka.sh status DIR
#       Prints the bootstrap address and exits 0 when the broker of DIR is up, else exits 1.
#
# A cluster (N nodes on loopback, default 3), as production runs one: every node is a KRaft
# combined broker+controller (process.roles=broker,controller) and a voter of the one static
# controller quorum (controller.quorum.voters=1@..,2@..,3@..), so 3 nodes survive the loss of any
# one, controller included. Combined mode, not dedicated controllers: 3 JVMs instead of 6 on a
# 2-core machine, and killing a node then kills a broker and a voter at once, the harder case
# (Kafka's docs advise dedicated controllers for critical deployments, so they can be isolated and
# scaled apart from brokers; the protocols under test are the same). Each node: its own JVM,
# node.id = its index I (1..N), two loopback ports picked free and kept in DIR/ports (the
# controller ports are in every node's voters, so a node always restarts on its own ports),
# DIR/node-I/{server.properties,data/,kafka.log}. One cluster id formatted on all nodes. Durability defaults: replication factor
# min(N,3) for new and internal topics (offsets, transactions, share state), min.insync.replicas
# and transaction.state.log.min.isr 2, unclean.leader.election.enable=false, auto-create off.
# Failure detection keeps Kafka's defaults: after a SIGKILL the controller fences the node after
# broker.session.timeout.ms (9 s), then moves its leaderships and shrinks ISRs; a SIGTERM
# (controlled shutdown) moves them at once. Leadership returns to a restarted node only with the
# periodic preferred-leader check (5 min) or elect-leaders.
#   scripts/kafka.sh cluster-start DIR [--nodes N] [--watch-pid PID]
#       Start the cluster of DIR (creating it with N nodes, default 3), or its nodes that are down.
#       Ready when every node has started and a topic with one partition per node and N replicas
#       (fracture-cluster-ready) has all replicas in sync. Prints the bootstrap list
#       127.0.0.1:P1,127.0.0.1:P2,... as the last line of stdout. Same ports and data across
#       restarts (new ports only when all nodes are down and an old port is taken).
#       --watch-pid PID: a detached watchdog runs cluster-stop once process PID has exited.
#   scripts/kafka.sh cluster-stop DIR
#       SIGTERM to all nodes at once, SIGKILL after 30 s. A node still in its controlled
#       shutdown once a majority has exited cannot finish it (no controller quorum left): it gets
#       SIGKILL 5 s later. Succeeds when nothing runs.
#   scripts/kafka.sh cluster-status DIR
#       One line per node, "I up|down PID|- 127.0.0.1:PORT"; exits 0 only when all are up.
#   scripts/kafka.sh node-kill DIR I      SIGKILL node I (returns once it is gone).
#   scripts/kafka.sh node-disk-fail DIR I [--timeout S]
#       Node I's disk stops taking writes: RLIMIT_FSIZE 0 on its JVM (prlimit), so every write
#       that would grow a file fails with EFBIG, as on a full or failed disk (root ignores file
#       permissions, and a sandbox cannot mount a disk to pull). Kafka takes a log dir whose
#       writes fail offline, and with its only log dir (the metadata log's too) gone the node
#       halts; returns once it has exited (default patience 120 s), printing the seconds it took.
#       node-start brings it back on the same data, as after the disk is freed or replaced.
#   scripts/kafka.sh node-stop DIR I      SIGTERM node I (controlled shutdown), SIGKILL after 30 s.
#   scripts/kafka.sh node-start DIR I
#       Restart node I on its ports and data; prints its address once it has started (it may
#       still be catching up: see in-sync). Refused when it would not join a quorum majority.
#   scripts/kafka.sh node-pid DIR I       Pid of node I; exits 1 when it is not running.
#   scripts/kafka.sh in-sync DIR [--timeout S]
#       Wait until every node is up and no partition of any topic is under-replicated.
#   scripts/kafka.sh leader DIR TOPIC PARTITION
#       Prints the node index (= node.id) leading the partition; exits 1 when it has no leader.
#   scripts/kafka.sh isr DIR TOPIC PARTITION
#       Prints its in-sync replicas, e.g. 2,3,1.
#   scripts/kafka.sh topics DIR ARGS...
#       TopicCommand against the running nodes, e.g. topics DIR --create --topic t
#       --partitions 6 --replication-factor 3, or topics DIR --describe --topic t.
#   scripts/kafka.sh elect-leaders DIR    Preferred-leader election for all partitions.
#   scripts/kafka.sh cluster-roll DIR
#       Rolling restart as operators do it: for each node, wait for in-sync, node-stop,
#       node-start; then in-sync again. Prints the bootstrap list.
# Measured here (2 cores, Kafka 4.1.2, Java 17): a fresh 3-node cluster is ready in 16-19 s, a
# restart in 14 s; 220-300 MB RSS per node after a few thousand records; node-start 5-8 s, back
# in sync 2-3 s later; leader moved 9-13 s after a SIGKILL.
# Producer pitfall: acks=all writes to partitions that merely have a replica on a killed node
# stall until it is fenced (~9 s). A client with a short request timeout gives up and reports
# records as failed that are in fact written (ConsoleProducer's defaults, --request-timeout-ms
# 1500 and --message-send-max-retries 3, do exactly that): use request.timeout.ms >= 30 s and
# unlimited retries with idempotence, as librdkafka's defaults are.
#
# Environment:
#   FRACTURE_CACHE           cache folder (default $HOME/.cache/fracture)
#   FRACTURE_KAFKA_VERSION   org.apache.kafka:kafka_2.13 version (default below)
#   FRACTURE_KAFKA_TIMEOUT   seconds to wait for readiness (default 90; for a cluster, of
#                            cluster-start / node-start / in-sync, default 180)
#   FRACTURE_KAFKA_LOG_LEVEL root log level in DIR/kafka.log (default INFO)
#   FRACTURE_KAFKA_HEAP      JVM heap flags (default "-Xms256m -Xmx1g"; per cluster node
#                            "-Xms128m -Xmx512m")
#   FRACTURE_KAFKA_STOP_GRACE  cluster nodes: seconds from SIGTERM to SIGKILL (default 30)
#   FRACTURE_KAFKA_TOOL_TIMEOUT  seconds one Kafka tool run may take (default 60)
#   JAVA_HOME                picks the java binary (else java on PATH)
#
# Tools of the distribution come with it, e.g.:
#   java -cp "$(scripts/kafka.sh install)/*" org.apache.kafka.tools.TopicCommand \
#        --bootstrap-server 127.0.0.1:PORT --describe
set -euo pipefail

KAFKA_VERSION="${FRACTURE_KAFKA_VERSION:-4.1.2}"
CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
KAFKA_HOME="$CACHE/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
MARKER="$KAFKA_HOME/.installed"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SELF="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"
POM="$SCRIPT_DIR/kafka/pom.xml"
READY_TIMEOUT="${FRACTURE_KAFKA_TIMEOUT:-90}"
LOG_LEVEL="${FRACTURE_KAFKA_LOG_LEVEL:-INFO}"
HEAP="${FRACTURE_KAFKA_HEAP:--Xms256m -Xmx1g}"
STOP_GRACE=15

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

java_bin() {
  if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then
    echo "$JAVA_HOME/bin/java"
  elif command -v java >/dev/null 2>&1; then
    command -v java
  else
    die "java not found: Kafka 4 needs Java 17+ (Debian: apt-get install openjdk-17-jre-headless)"
  fi
}

check_java() {
  local java major
  java="$(java_bin)"
  major="$("$java" -XshowSettings:properties -version 2>&1 |
    sed -n 's/^ *java\.specification\.version = //p' | head -n1)"
  major="${major#1.}"
  [[ "$major" =~ ^[0-9]+$ ]] || die "cannot tell the version of $java"
  ((major >= 17)) || die "$java is Java $major; Kafka $KAFKA_VERSION needs Java 17+"
}

# Stamp of what an install contains: a change of the pom or the version reinstalls.
install_stamp() {
  { echo "kafka_2.13 $KAFKA_VERSION"; cat "$POM"; } | sha256sum | cut -d' ' -f1
}

installed() {
  [[ -f "$MARKER" && -d "$LIBS" ]] && [[ "$(cat "$MARKER")" == "$(install_stamp)" ]] &&
    compgen -G "$LIBS/kafka_2.13-$KAFKA_VERSION.jar" >/dev/null
}

cmd_install() {
  [[ -f "$POM" ]] || die "missing $POM"
  if installed; then
    echo "$LIBS"
    return 0
  fi
  mkdir -p "$KAFKA_HOME"
  # Tests may start several brokers at once: one install at a time.
  exec 9>"$KAFKA_HOME.lock"
  flock 9
  if installed; then
    exec 9>&-
    echo "$LIBS"
    return 0
  fi
  check_java
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Debian: apt-get install maven)"
  local tmp="$KAFKA_HOME/libs.tmp.$$" ilog="$KAFKA_HOME/install.log" t0=$SECONDS
  rm -rf "$tmp"
  local mvn=(mvn -B -f "$POM" -Dmaven.repo.local="$CACHE/m2" -Dkafka.version="$KAFKA_VERSION"
    -Dlibs.dir="$tmp" dependency:copy-dependencies)
  # Offline first (the local repository may already hold everything), then online.
  if ! "${mvn[@]}" -o >"$ilog" 2>&1; then
    log "downloading Kafka $KAFKA_VERSION jars from Maven Central into $CACHE/m2 ..."
    rm -rf "$tmp"
    if ! "${mvn[@]}" >>"$ilog" 2>&1; then
      tail -n 40 "$ilog" >&2
      rm -rf "$tmp"
      die "maven failed (full log: $ilog)"
    fi
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "maven did not produce kafka_2.13-$KAFKA_VERSION.jar"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
  install_stamp >"$MARKER"
  exec 9>&-
  log "installed Kafka $KAFKA_VERSION ($(find "$LIBS" -name '*.jar' | wc -l) jars) in $((SECONDS - t0)) s"
  echo "$LIBS"
}

# COUNT (default 2) distinct free loopback ports on one line: "PORT CONTROLLER_PORT ...".
free_ports() {
  command -v python3 >/dev/null 2>&1 || die "python3 is needed to pick free ports"
  python3 - "${1:-2}" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
EOF
}

ports_free() {
  python3 - "$@" <<'EOF'
import socket, sys
for p in sys.argv[1:]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # As the JVM's server sockets do: old connections in TIME_WAIT do not block a restart.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(p)))
    except OSError:
        sys.exit(1)
    finally:
        s.close()
EOF
}

# A random Kafka cluster id: 16 random bytes, base64url without padding (22 chars), never
# starting with '-' (it would read as an option), as org.apache.kafka.common.Uuid does.
cluster_id() {
  python3 - <<'EOF'
import base64, os
while True:
    b = os.urandom(16)
    s = base64.urlsafe_b64encode(b).decode().rstrip("=")
    if not s.startswith("-") and b.strip(b"\0") and b != b"\0" * 15 + b"\1":
        print(s)
        break
EOF
}

# Does FILE, from byte FROM on, have a line matching the grep arguments PATTERN...? Not
# `tail | grep -q`: under pipefail, tail dies of SIGPIPE when grep stops at a match with more
# than a pipe buffer (64 KiB) still to write, and the match reads as none.
log_has() {
  local file="$1" from="$2"
  shift 2
  grep -q "$@" < <(tail -c +"$from" "$file" 2>/dev/null)
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Is PID alive (not a zombie)?
alive() {
  local pid="$1" state
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    state="$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ "$state" != Z && -n "$state" ]] || return 1
  fi
}

# The pid of DIR's broker when it runs, else nothing.
broker_pid() {
  local dir="$1" pid
  [[ -f "$dir/kafka.pid" ]] || return 0
  pid="$(cat "$dir/kafka.pid" 2>/dev/null || true)"
  alive "$pid" || return 0
  # Guard against pid reuse: it must be the JVM started on this DIR's config.
  if [[ -r "/proc/$pid/cmdline" ]]; then
    tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF "$dir/server.properties" || return 0
  fi
  echo "$pid"
}

abs_dir() {
  mkdir -p "$1"
  (cd "$1" && pwd -P)
}

xml_escape() {
  local s="$1"
  s="${s//&/&amp;}"
  s="${s//</&lt;}"
  s="${s//>/&gt;}"
  s="${s//\"/&quot;}"
  echo "$s"
}

write_config() {
  local dir="$1" port="$2" cport="$3"
  cat >"$dir/server.properties" <<EOF
# Written by scripts/kafka.sh: KRaft combined mode, one node, loopback only.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data

# Single node: every internal topic with one replica, else the group / transaction / share
# coordinators never come up.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1

# Tests: no waiting for more members, topics only by explicit creation.
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=1

# Small machine (2 cores).
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=33554432
EOF
  write_log4j "$dir"
}

# DIR/log4j2.xml: the broker logs to DIR/kafka.log only.
write_log4j() {
  local dir="$1" logfile
  logfile="$(xml_escape "$dir/kafka.log")"
  cat >"$dir/log4j2.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/kafka.sh: everything to kafka.log, nothing on stdout. -->
<Configuration status="WARN">
  <Appenders>
    <File name="file" fileName="$logfile" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Root level="$LOG_LEVEL"><AppenderRef ref="file"/></Root>
    <!-- kafka.sh waits for its "Kafka Server started". -->
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
    <Logger name="kafka.request.logger" level="WARN"/>
    <Logger name="kafka.network.RequestChannel\$" level="WARN"/>
    <Logger name="state.change.logger" level="WARN"/>
    <Logger name="kafka.authorizer.logger" level="WARN"/>
    <Logger name="org.apache.kafka.common.config.AbstractConfig" level="WARN"/>
    <Logger name="org.apache.kafka.common.utils.AppInfoParser" level="WARN"/>
  </Loggers>
</Configuration>
EOF
}

# Format DIR/data (as DIR/server.properties says) for cluster id CID, unless it already is.
format_dir() {
  local dir="$1" cid="$2"
  if ! "$(java_bin)" -Xmx256m -Dlog4j2.configurationFile="$dir/log4j2.xml" -Dkafka.logs.dir="$dir" \
    -Djava.awt.headless=true -cp "$LIBS/*" kafka.tools.StorageTool format --ignore-formatted \
    -t "$cid" -c "$dir/server.properties" >"$dir/format.log" 2>&1; then
    cat "$dir/format.log" >&2
    die "formatting $dir/data failed"
  fi
}

# Start the broker JVM of DIR (server.properties, log4j2.xml) detached, with heap flags HEAP_FLAGS;
# prints its pid, also written to DIR/kafka.pid.
launch_broker() {
  local dir="$1" heap java i pid=""
  read -r -a heap <<<"$2"
  java="$(java_bin)"
  rm -f "$dir/kafka.pid"
  # setsid -f: own session, survives this script and its terminal; the shell writes its pid
  # and then becomes the JVM, so kafka.pid is the JVM's pid. No lock descriptor is inherited.
  # shellcheck disable=SC2016
  setsid -f bash -c 'echo $$ >"$1/kafka.pid.tmp" && mv "$1/kafka.pid.tmp" "$1/kafka.pid"; shift; exec "$@"' \
    _ "$dir" nohup "$java" "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
    -XX:+ExitOnOutOfMemoryError -Dlog4j2.configurationFile="$dir/log4j2.xml" \
    -Dkafka.logs.dir="$dir" -Djava.awt.headless=true -cp "$LIBS/*" \
    kafka.Kafka "$dir/server.properties" </dev/null >>"$dir/kafka.out" 2>&1 8>&- 9>&-
  for ((i = 0; i < 100; i++)); do
    [[ -s "$dir/kafka.pid" ]] && { pid="$(cat "$dir/kafka.pid")"; break; }
    sleep 0.05
  done
  [[ -n "$pid" ]] || die "the broker did not start (see $dir/kafka.out)"
  echo "$pid"
}

# Start a detached watchdog: stop DIR's broker (pid BPID) once process WPID has exited.
start_watchdog() {
  local dir="$1" wpid="$2" bpid="$3"
  alive "$wpid" || { log "watched process $wpid is already gone: stopping the broker"; cmd_stop "$dir"; exit 1; }
  setsid -f "$SELF" _watch "$dir" "$wpid" "$bpid" </dev/null >>"$dir/watchdog.log" 2>&1
}

proc_start_time() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f20; }

cmd_watch() {
  local dir="$1" wpid="$2" bpid="$3" wstart
  wstart="$(proc_start_time "$wpid" || true)"
  echo "$$" >"$dir/watchdog.pid" 2>/dev/null || true
  while alive "$bpid"; do
    if ! alive "$wpid" || [[ "$(proc_start_time "$wpid" || true)" != "$wstart" ]]; then
      echo "[$(date -Is)] process $wpid is gone: stopping broker $bpid"
      stop_pid "$bpid"
      [[ "$(cat "$dir/kafka.pid" 2>/dev/null || true)" != "$bpid" ]] || rm -f "$dir/kafka.pid" || true
      break
    fi
    sleep 1
  done
  rm -f "$dir/watchdog.pid" || true
}

# SIGTERM PID, SIGKILL after GRACE seconds (default STOP_GRACE); returns once it is gone.
stop_pid() {
  local pid="$1" grace="${2:-$STOP_GRACE}" i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  log "broker $pid still up after ${grace}s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  die "broker $pid survived SIGKILL"
}

cmd_stop() {
  local dir pid
  [[ -d "$1" ]] || { log "no such directory $1: nothing to stop"; return 0; }
  dir="$(abs_dir "$1")"
  pid="$(broker_pid "$dir")"
  if [[ -n "$pid" ]]; then
    stop_pid "$pid"
    log "stopped broker $pid ($dir)"
  fi
  rm -f "$dir/kafka.pid"
}

cmd_status() {
  local dir pid bootstrap
  [[ -d "$1" ]] || return 1
  dir="$(abs_dir "$1")"
  pid="$(broker_pid "$dir")"
  [[ -n "$pid" && -f "$dir/bootstrap" ]] || return 1
  bootstrap="$(cat "$dir/bootstrap")"
  tcp_open "${bootstrap##*:}" || return 1
  echo "$bootstrap"
}

cmd_start() {
  local dir="" watch=""
  while (($#)); do
    case "$1" in
      --watch-pid) (($# >= 2)) || usage; watch="$2"; shift 2 ;;
      --watch-pid=*) watch="${1#*=}"; shift ;;
      -h | --help) usage ;;
      -*) die "unknown option $1" ;;
      *) [[ -z "$dir" ]] || usage; dir="$1"; shift ;;
    esac
  done
  [[ -n "$dir" ]] || usage
  [[ -z "$watch" || "$watch" =~ ^[0-9]+$ ]] || die "--watch-pid needs a process id, got '$watch'"
  dir="$(abs_dir "$dir")"

  local pid
  pid="$(broker_pid "$dir")"
  if [[ -n "$pid" ]]; then
    local bootstrap
    if bootstrap="$(cmd_status "$dir")"; then
      log "broker $pid of $dir is already running"
      [[ -z "$watch" ]] || start_watchdog "$dir" "$watch" "$pid"
      echo "$bootstrap"
      return 0
    fi
    log "broker $pid of $dir runs but does not answer: restarting it"
    stop_pid "$pid"
  fi

  cmd_install >/dev/null
  check_java
  mkdir -p "$dir/data"

  local cid
  if [[ -s "$dir/cluster.id" ]]; then
    cid="$(cat "$dir/cluster.id")"
  else
    cid="$(cluster_id)"
    echo "$cid" >"$dir/cluster.id"
  fi

  local attempt port cport
  for attempt in 1 2 3; do
    # Same DIR, same address across restarts when the ports are still free.
    if [[ -s "$dir/ports" ]] && read -r port cport <"$dir/ports" && ports_free "$port" "$cport"; then
      :
    else
      read -r port cport < <(free_ports) || true
      [[ "${port:-}" =~ ^[0-9]+$ && "${cport:-}" =~ ^[0-9]+$ ]] || die "could not pick free ports"
      echo "$port $cport" >"$dir/ports"
    fi
    write_config "$dir" "$port" "$cport"

    format_dir "$dir" "$cid"

    rm -f "$dir/bootstrap"
    # Only what this attempt logs counts when looking for a port clash below.
    local log_from out_from
    log_from=$(($(stat -c %s "$dir/kafka.log" 2>/dev/null || echo 0) + 1))
    out_from=$(($(stat -c %s "$dir/kafka.out" 2>/dev/null || echo 0) + 1))
    local t0=$SECONDS
    pid="$(launch_broker "$dir" "$HEAP")"

    [[ -z "$watch" ]] || start_watchdog "$dir" "$watch" "$pid"

    local ready=0
    while ((SECONDS - t0 < READY_TIMEOUT)); do
      if ! alive "$pid"; then
        break
      fi
      # The port answering is not enough (another process may have taken it meanwhile): the
      # JVM must also have logged that it started (KafkaRaftServer logs at INFO, see log4j2.xml).
      if log_has "$dir/kafka.log" "$log_from" -e 'Kafka Server started' && tcp_open "$port"; then
        alive "$pid" && ready=1
        break
      fi
      sleep 0.2
    done
    if ((ready)); then
      echo "127.0.0.1:$port" >"$dir/bootstrap"
      log "broker $pid ready in $((SECONDS - t0)) s (logs: $dir/kafka.log)"
      echo "127.0.0.1:$port"
      return 0
    fi

    if alive "$pid"; then
      log "broker $pid not ready after ${READY_TIMEOUT}s: stopping it"
      stop_pid "$pid"
    fi
    rm -f "$dir/kafka.pid"
    if ((attempt < 3)) &&
      { log_has "$dir/kafka.log" "$log_from" -e 'BindException' -e 'Address already in use' ||
        log_has "$dir/kafka.out" "$out_from" -e 'BindException' -e 'Address already in use'; }; then
      log "port taken meanwhile, retrying with other ports"
      rm -f "$dir/ports"
      continue
    fi
    {
      echo "---- tail of $dir/kafka.log"
      tail -n 60 "$dir/kafka.log" 2>/dev/null || true
      echo "---- tail of $dir/kafka.out"
      tail -n 20 "$dir/kafka.out" 2>/dev/null || true
    } >&2
    die "the broker in $dir did not become ready"
  done
}

# ---------------------------------------------------------------------------------------------
# Cluster mode: N combined broker+controller nodes on loopback whose files all live in one DIR:
#   DIR/nodes (N), DIR/cluster.id, DIR/ports (line I: "PORT CONTROLLER_PORT" of node I),
#   DIR/bootstrap, DIR/running (token of the current start, for the watchdogs), DIR/.lock,
#   DIR/tools-log4j2.xml, DIR/watchdog.log, and per node DIR/node-I/ (server.properties,
#   log4j2.xml, data/, kafka.log, kafka.out, kafka.pid, format.log). Node index I = node.id.

CLUSTER_HEAP="${FRACTURE_KAFKA_HEAP:--Xms128m -Xmx512m}"
CLUSTER_TIMEOUT="${FRACTURE_KAFKA_TIMEOUT:-180}"
CLUSTER_STOP_GRACE="${FRACTURE_KAFKA_STOP_GRACE:-30}"
TOOL_TIMEOUT="${FRACTURE_KAFKA_TOOL_TIMEOUT:-60}"
READY_TOPIC="fracture-cluster-ready"
CLUSTER_LOCKED=""

node_dir() { echo "$1/node-$2"; }

# Node count of the cluster in (absolute) DIR.
cluster_nodes() {
  local n
  [[ -s "$1/nodes" ]] || die "$1 holds no cluster (no $1/nodes): start one with cluster-start"
  n="$(cat "$1/nodes")"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "bad node count in $1/nodes: '$n'"
  echo "$n"
}

# Absolute path of the existing cluster DIR, or die.
cluster_dir() {
  [[ -d "$1" ]] || die "no such directory $1"
  local d
  d="$(abs_dir "$1")"
  cluster_nodes "$d" >/dev/null
  echo "$d"
}

check_index() {
  local n
  n="$(cluster_nodes "$1")"
  [[ "$2" =~ ^[1-9][0-9]*$ ]] && (($2 <= n)) || die "node index must be 1..$n, got '$2'"
}

# One cluster operation at a time per DIR (re-entrant within this process). The lock descriptor
# (8) is closed for every process this script leaves running.
cluster_lock() {
  [[ "$CLUSTER_LOCKED" == "$1" ]] && return 0
  exec 8>"$1/.lock"
  flock 8
  CLUSTER_LOCKED="$1"
}

# "PORT CONTROLLER_PORT" of node I (both numbers, or die).
node_ports() {
  local line
  line="$(sed -n "$2p" "$1/ports" 2>/dev/null || true)"
  [[ "$line" =~ ^[0-9]+\ [0-9]+$ ]] || die "no ports recorded for node $2 in $1/ports"
  echo "$line"
}

node_port() {
  local line
  line="$(node_ports "$1" "$2")"
  echo "${line%% *}"
}

# Do the ports of DIR/ports cover N nodes?
ports_recorded() {
  local dir="$1" n="$2" i
  [[ -s "$dir/ports" ]] || return 1
  for ((i = 1; i <= n; i++)); do
    [[ "$(sed -n "${i}p" "$dir/ports")" =~ ^[0-9]+\ [0-9]+$ ]] || return 1
  done
}

node_up() {
  local nd pid
  nd="$(node_dir "$1" "$2")"
  pid="$(broker_pid "$nd")"
  [[ -n "$pid" ]] && tcp_open "$(node_port "$1" "$2")"
}

# Comma-separated addresses of all nodes, or (live) of those that run (all when none does).
cluster_bootstrap() {
  local dir="$1" live="${2:-}" n i out=""
  n="$(cluster_nodes "$dir")"
  for ((i = 1; i <= n; i++)); do
    if [[ -z "$live" || -n "$(broker_pid "$(node_dir "$dir" "$i")")" ]]; then
      out+=",127.0.0.1:$(node_port "$dir" "$i")"
    fi
  done
  [[ -n "$out" ]] || out="$(cluster_bootstrap "$dir")"
  echo "${out#,}"
}

cluster_write_config() {
  local dir="$1" n="$2" i p c voters="" nd rf minisr parts
  # A replica on every node up to 3; writes need 2 in sync (1 for a one-node cluster).
  rf=$((n < 3 ? n : 3))
  minisr=$((rf < 2 ? rf : 2))
  parts=$((n < 3 ? n : 3))
  for ((i = 1; i <= n; i++)); do
    read -r p c <<<"$(node_ports "$dir" "$i")"
    voters+="${voters:+,}$i@127.0.0.1:$c"
  done
  for ((i = 1; i <= n; i++)); do
    nd="$(node_dir "$dir" "$i")"
    mkdir -p "$nd/data"
    read -r p c <<<"$(node_ports "$dir" "$i")"
    cat >"$nd/server.properties" <<EOF
# Written by scripts/kafka.sh cluster-start: node $i of a $n-node KRaft cluster, loopback only.
# Combined mode: every node is a broker and a voter of the one controller quorum.
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$p,CONTROLLER://127.0.0.1:$c
advertised.listeners=PLAINTEXT://127.0.0.1:$p
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$nd/data

# Durability as in production: $rf replicas, $minisr in sync for acks=all, internal topics too
# (else a dead node makes groups or transactions unreadable), no unclean leader election.
default.replication.factor=$rf
min.insync.replicas=$minisr
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=$parts
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$minisr
transaction.state.log.num.partitions=$parts
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$minisr
share.coordinator.state.topic.num.partitions=$parts
unclean.leader.election.enable=false

# Tests: no waiting for more members, topics only by explicit creation. Failure detection
# (broker.session.timeout.ms, replica.lag.time.max.ms) and leader rebalancing keep Kafka's
# defaults, as a real cluster would.
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.partitions=1

# Small machine (2 cores, several nodes).
num.network.threads=2
num.io.threads=2
background.threads=2
num.recovery.threads.per.data.dir=1
log.cleaner.dedupe.buffer.size=16777216
EOF
    write_log4j "$nd"
  done
  cat >"$dir/tools-log4j2.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/kafka.sh: the tools log warnings to stderr, not dead-node chatter. -->
<Configuration status="WARN">
  <Appenders>
    <Console name="err" target="SYSTEM_ERR"><PatternLayout pattern="[%d] %p %m (%c)%n"/></Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="err"/></Root>
    <Logger name="org.apache.kafka.clients.NetworkClient" level="ERROR"/>
    <Logger name="org.apache.kafka.clients.admin.internals" level="ERROR"/>
  </Loggers>
</Configuration>
EOF
}

# Is node DIR's log dir formatted for cluster CID? (Saves a JVM start per node on restarts.)
node_formatted() {
  grep -qxF "cluster.id=$2" "$1/data/meta.properties" 2>/dev/null &&
    [[ -f "$1/data/bootstrap.checkpoint" ]]
}

# A tool of the distribution: cluster_tool DIR CLASS ARGS...
cluster_tool() {
  local dir="$1"
  shift
  timeout --kill-after=5 "$TOOL_TIMEOUT" "$(java_bin)" -Xms32m -Xmx256m -XX:+UseSerialGC \
    -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$dir/tools-log4j2.xml" \
    -Djava.awt.headless=true -cp "$LIBS/*" "$@" 8>&- 9>&-
}

topic_command() {
  local dir="$1"
  shift
  cluster_tool "$dir" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$(cluster_bootstrap "$dir" live)" "$@"
}

# "PARTITION LEADER ISR REPLICAS" per partition of TOPIC (LEADER -1 when none).
describe_partitions() {
  local dir="$1" topic="$2" out
  out="$(topic_command "$dir" --describe --topic "$topic")" || return 1
  awk -v t="$topic" '
    /Partition:/ {
      topic = ""; part = ""; leader = "-1"; isr = ""; reps = ""
      for (i = 1; i < NF; i++) {
        v = $(i + 1)
        if (v ~ /:$/) v = ""
        if ($i == "Topic:") topic = v
        else if ($i == "Partition:") part = v
        else if ($i == "Leader:") leader = (v == "" || v == "none") ? "-1" : v
        else if ($i == "Isr:") isr = v
        else if ($i == "Replicas:") reps = v
      }
      if (topic == t && part != "") print part, leader, (isr == "" ? "-" : isr), (reps == "" ? "-" : reps)
    }' <<<"$out"
}

# Wait (until SECONDS reaches DEADLINE) for every node of DIR to be registered and replicating:
# the readiness topic, one partition per node and a replica on every node, fully in sync.
cluster_wait_ready() {
  local dir="$1" n="$2" deadline="$3" out
  until out="$(topic_command "$dir" --create --if-not-exists --topic "$READY_TOPIC" \
    --partitions "$n" --replication-factor "$n" 2>&1)"; do
    if ((SECONDS >= deadline)); then
      echo "$out" >&2
      die "the cluster in $dir did not accept a topic with $n replicas in time"
    fi
    sleep 1
  done
  while :; do
    out="$(describe_partitions "$dir" "$READY_TOPIC" 2>/dev/null || true)"
    if [[ -n "$out" ]] && awk -v n="$n" '$2 == -1 || split($3, a, ",") != n { bad = 1 } END { exit bad }' <<<"$out"; then
      return 0
    fi
    if ((SECONDS >= deadline)); then
      echo "$out" >&2
      die "the replicas of $READY_TOPIC in $dir did not get in sync in time"
    fi
    sleep 1
  done
}

# Wait for node I's JVM PID to log that it started (after byte LOG_FROM of its kafka.log) and to
# accept connections. 0: ready, 1: the JVM died, 2: not before DEADLINE.
wait_node() {
  local dir="$1" i="$2" pid="$3" log_from="$4" deadline="$5" nd port
  nd="$(node_dir "$dir" "$i")"
  port="$(node_port "$dir" "$i")"
  while :; do
    alive "$pid" || return 1
    if log_has "$nd/kafka.log" "$log_from" -e 'Kafka Server started' && tcp_open "$port"; then
      alive "$pid" && return 0
      return 1
    fi
    ((SECONDS < deadline)) || return 2
    sleep 0.2
  done
}

log_size() { echo $(($(stat -c %s "$1" 2>/dev/null || echo 0) + 1)); }

node_tails() {
  local nd="$1"
  echo "---- tail of $nd/kafka.log"
  tail -n 40 "$nd/kafka.log" 2>/dev/null || true
  echo "---- tail of $nd/kafka.out"
  tail -n 20 "$nd/kafka.out" 2>/dev/null || true
}

start_cluster_watchdog() {
  local dir="$1" wpid="$2"
  if ! alive "$wpid"; then
    log "watched process $wpid is already gone: stopping the cluster"
    cmd_cluster_stop "$dir"
    exit 1
  fi
  setsid -f bash "$SELF" _cwatch "$dir" "$wpid" </dev/null >>"$dir/watchdog.log" 2>&1 8>&- 9>&-
}

# Watchdog: stop every node of DIR once process WPID has exited; ends with cluster-stop.
cmd_cwatch() {
  local dir="$1" wpid="$2" wstart token
  wstart="$(proc_start_time "$wpid" || true)"
  token="$(cat "$dir/running" 2>/dev/null || true)"
  [[ -n "$token" ]] || return 0
  while [[ "$(cat "$dir/running" 2>/dev/null || true)" == "$token" ]]; do
    if ! alive "$wpid" || [[ "$(proc_start_time "$wpid" || true)" != "$wstart" ]]; then
      echo "[$(date -Is)] process $wpid is gone: stopping the cluster in $dir"
      cmd_cluster_stop "$dir"
      break
    fi
    sleep 1
  done
}

cmd_cluster_start() {
  local dir="" nodes="" watch=""
  while (($#)); do
    case "$1" in
      --nodes) (($# >= 2)) || usage; nodes="$2"; shift 2 ;;
      --nodes=*) nodes="${1#*=}"; shift ;;
      --watch-pid) (($# >= 2)) || usage; watch="$2"; shift 2 ;;
      --watch-pid=*) watch="${1#*=}"; shift ;;
      -h | --help) usage ;;
      -*) die "unknown option $1" ;;
      *) [[ -z "$dir" ]] || usage; dir="$1"; shift ;;
    esac
  done
  [[ -n "$dir" ]] || usage
  [[ -z "$nodes" || "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes needs a positive number, got '$nodes'"
  [[ -z "$watch" || "$watch" =~ ^[0-9]+$ ]] || die "--watch-pid needs a process id, got '$watch'"
  dir="$(abs_dir "$dir")"
  cluster_lock "$dir"

  local n
  if [[ -s "$dir/nodes" ]]; then
    n="$(cluster_nodes "$dir")"
    [[ -z "$nodes" || "$nodes" == "$n" ]] || die "$dir holds a $n-node cluster, not $nodes (use another DIR)"
  else
    n="${nodes:-3}"
    echo "$n" >"$dir/nodes"
  fi

  cmd_install >/dev/null
  check_java
  local cid
  if [[ -s "$dir/cluster.id" ]]; then
    cid="$(cat "$dir/cluster.id")"
  else
    cid="$(cluster_id)"
    echo "$cid" >"$dir/cluster.id"
  fi

  local t0=$SECONDS deadline=$((SECONDS + CLUSTER_TIMEOUT))
  [[ -s "$dir/running" ]] || echo "$$-$(date +%s%N)" >"$dir/running"
  [[ -z "$watch" ]] || start_cluster_watchdog "$dir" "$watch"

  local attempt i nd pid any_up ports p c
  local -a pids log_from out_from down
  for attempt in 1 2 3; do
    any_up=0
    down=()
    pids=()
    for ((i = 1; i <= n; i++)); do
      pid="$(broker_pid "$(node_dir "$dir" "$i")")"
      pids[i]="$pid"
      if [[ -n "$pid" ]]; then any_up=1; else down+=("$i"); fi
    done
    if ((!any_up)); then
      # Same DIR, same addresses across restarts when all the ports are still free.
      ports=()
      if ports_recorded "$dir" "$n"; then
        for ((i = 1; i <= n; i++)); do ports+=($(node_ports "$dir" "$i")); done
      fi
      if ((${#ports[@]} != 2 * n)) || ! ports_free "${ports[@]}"; then
        read -r -a ports < <(free_ports $((2 * n))) || true
        ((${#ports[@]} == 2 * n)) || die "could not pick free ports"
        : >"$dir/ports.tmp"
        for ((i = 0; i < n; i++)); do echo "${ports[2 * i]} ${ports[2 * i + 1]}" >>"$dir/ports.tmp"; done
        mv "$dir/ports.tmp" "$dir/ports"
      fi
    else
      ports_recorded "$dir" "$n" || die "nodes of $dir run but $dir/ports is missing"
      for i in "${down[@]}"; do
        read -r p c <<<"$(node_ports "$dir" "$i")"
        ports_free "$p" "$c" || die "port $p or $c of node $i is taken by another process"
      done
    fi
    ((${#down[@]})) || break
    cluster_write_config "$dir" "$n"

    # Format the missing nodes in parallel (a JVM each), then start them all: a majority of
    # the controller quorum must be up before any of them finishes starting.
    local -a fmt=()
    for i in "${down[@]}"; do
      node_formatted "$(node_dir "$dir" "$i")" "$cid" && continue
      format_dir "$(node_dir "$dir" "$i")" "$cid" &
      fmt+=($!)
    done
    for pid in "${fmt[@]}"; do wait "$pid" || die "formatting failed (see the format.log files under $dir)"; done
    for i in "${down[@]}"; do
      nd="$(node_dir "$dir" "$i")"
      log_from[i]="$(log_size "$nd/kafka.log")"
      out_from[i]="$(log_size "$nd/kafka.out")"
      pids[i]="$(launch_broker "$nd" "$CLUSTER_HEAP")"
    done

    local failed=() rc
    for i in "${down[@]}"; do
      rc=0
      wait_node "$dir" "$i" "${pids[i]}" "${log_from[i]}" "$deadline" || rc=$?
      ((rc == 0)) || failed+=("$i:$rc")
    done
    ((${#failed[@]})) || break

    local clash=0 f
    for f in "${failed[@]}"; do
      nd="$(node_dir "$dir" "${f%%:*}")"
      if log_has "$nd/kafka.log" "${log_from[${f%%:*}]}" -e 'BindException' -e 'Address already in use' ||
        log_has "$nd/kafka.out" "${out_from[${f%%:*}]}" -e 'BindException' -e 'Address already in use'; then
        clash=1
      fi
    done
    if ((clash && !any_up && attempt < 3)); then
      log "a port was taken meanwhile: retrying all nodes with other ports"
      for i in "${down[@]}"; do stop_pid "${pids[i]}" "$CLUSTER_STOP_GRACE"; done
      rm -f "$dir/ports"
      continue
    fi
    for f in "${failed[@]}"; do
      node_tails "$(node_dir "$dir" "${f%%:*}")" >&2
    done
    die "node(s) ${failed[*]%%:*} of $dir did not start (in $((SECONDS - t0)) s); 'cluster-stop $dir' stops the rest"
  done

  cluster_wait_ready "$dir" "$n" "$deadline"
  cluster_bootstrap "$dir" >"$dir/bootstrap"
  log "$n-node cluster ready in $((SECONDS - t0)) s (logs: $dir/node-*/kafka.log)"
  cat "$dir/bootstrap"
}

cmd_cluster_stop() {
  [[ -d "$1" ]] || { log "no such directory $1: nothing to stop"; return 0; }
  local dir n i pid left since=""
  dir="$(abs_dir "$1")"
  [[ -s "$dir/nodes" ]] || { log "$dir holds no cluster: nothing to stop"; return 0; }
  cluster_lock "$dir"
  n="$(cluster_nodes "$dir")"
  rm -f "$dir/running"
  # All at once (one by one, the last nodes would wait for a quorum that is gone). A node still
  # in its controlled shutdown once a majority has exited cannot finish it (Kafka would wait up to
  # 5 minutes): SIGKILL it after 5 s more. Everyone gets SIGKILL after the grace period.
  local -a pids=()
  local t0=$SECONDS
  for ((i = 1; i <= n; i++)); do
    pid="$(broker_pid "$(node_dir "$dir" "$i")")"
    [[ -z "$pid" ]] || { kill -TERM "$pid" 2>/dev/null || true; pids[i]="$pid"; }
  done
  while :; do
    left=()
    for i in "${!pids[@]}"; do
      if alive "${pids[i]}"; then left+=("$i"); else
        rm -f "$(node_dir "$dir" "$i")/kafka.pid"
        log "stopped node $i (pid ${pids[i]})"
        unset "pids[i]"
      fi
    done
    ((${#left[@]})) || break
    if ((n > 1 && ${#left[@]} < n / 2 + 1)); then
      since="${since:-$SECONDS}"
    fi
    if ((SECONDS - t0 >= CLUSTER_STOP_GRACE)) || { [[ -n "$since" ]] && ((SECONDS - since >= 5)); }; then
      for i in "${left[@]}"; do
        if [[ -n "$since" ]]; then
          log "node $i (pid ${pids[i]}) cannot finish its controlled shutdown without a controller quorum: SIGKILL"
        else
          log "node $i (pid ${pids[i]}) still up after ${CLUSTER_STOP_GRACE}s: SIGKILL"
        fi
        kill -KILL "${pids[i]}" 2>/dev/null || true
      done
      for i in "${left[@]}"; do stop_pid "${pids[i]}" 5; done
    fi
    sleep 0.2
  done
  log "cluster $dir stopped in $((SECONDS - t0)) s"
}

# Prints "I up|down PID|- 127.0.0.1:PORT" per node; exits 0 when every node is up.
cmd_cluster_status() {
  local dir n i pid state all=0
  dir="$(cluster_dir "$1")"
  n="$(cluster_nodes "$dir")"
  for ((i = 1; i <= n; i++)); do
    pid="$(broker_pid "$(node_dir "$dir" "$i")")"
    if node_up "$dir" "$i"; then state=up; else state=down; all=1; fi
    echo "$i $state ${pid:--} 127.0.0.1:$(node_port "$dir" "$i")"
  done
  return "$all"
}

cmd_node_pid() {
  local dir pid
  dir="$(cluster_dir "$1")"
  check_index "$dir" "$2"
  pid="$(broker_pid "$(node_dir "$dir" "$2")")"
  [[ -n "$pid" ]] || { log "node $2 of $dir is not running"; return 1; }
  echo "$pid"
}

cmd_node_kill() {
  local dir nd pid i
  dir="$(cluster_dir "$1")"
  check_index "$dir" "$2"
  nd="$(node_dir "$dir" "$2")"
  pid="$(broker_pid "$nd")"
  if [[ -z "$pid" ]]; then
    log "node $2 of $dir is not running"
    return 0
  fi
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.05
  done
  alive "$pid" && die "node $2 (pid $pid) survived SIGKILL"
  rm -f "$nd/kafka.pid"
  log "killed node $2 (pid $pid)"
}

cmd_node_disk_fail() {
  local dir nd pid i timeout=120
  dir="$(cluster_dir "$1")"
  check_index "$dir" "$2"
  if [[ "${3:-}" == --timeout ]]; then
    [[ "${4:-}" =~ ^[0-9]+$ ]] || die "--timeout needs seconds"
    timeout="$4"
  fi
  command -v prlimit >/dev/null 2>&1 || die "prlimit (util-linux) is needed to fail a disk"
  nd="$(node_dir "$dir" "$2")"
  pid="$(broker_pid "$nd")"
  [[ -n "$pid" ]] || die "node $2 of $dir is not running"
  local t0=$SECONDS
  prlimit --pid "$pid" --fsize=0 || die "prlimit --pid $pid --fsize=0 failed"
  for ((i = 0; i < timeout * 10; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  alive "$pid" && die "node $2 (pid $pid) still runs ${timeout} s after its disk failed"
  rm -f "$nd/kafka.pid"
  log "node $2 (pid $pid) halted $((SECONDS - t0)) s after its disk stopped taking writes"
  echo "$((SECONDS - t0))"
}

cmd_node_stop() {
  local dir nd pid
  dir="$(cluster_dir "$1")"
  check_index "$dir" "$2"
  nd="$(node_dir "$dir" "$2")"
  pid="$(broker_pid "$nd")"
  if [[ -z "$pid" ]]; then
    log "node $2 of $dir is not running"
    return 0
  fi
  local t0=$SECONDS
  stop_pid "$pid" "$CLUSTER_STOP_GRACE"
  rm -f "$nd/kafka.pid"
  log "stopped node $2 (pid $pid) in $((SECONDS - t0)) s"
}

# Restart node I with its data and ports; prints its address once it has started (it may still be
# catching up: see in-sync).
cmd_node_start() {
  local dir="$1" i="$2" n nd pid p c others=0 j k deadline log_from rc=0
  dir="$(cluster_dir "$dir")"
  check_index "$dir" "$i"
  cluster_lock "$dir"
  n="$(cluster_nodes "$dir")"
  nd="$(node_dir "$dir" "$i")"
  [[ -f "$nd/server.properties" && -s "$dir/cluster.id" ]] || die "node $i of $dir was never started: use cluster-start"
  read -r p c <<<"$(node_ports "$dir" "$i")"
  pid="$(broker_pid "$nd")"
  if [[ -n "$pid" ]]; then
    log "node $i (pid $pid) of $dir is already running"
    echo "127.0.0.1:$p"
    return 0
  fi
  for ((j = 1; j <= n; j++)); do
    ((j == i)) || [[ -z "$(broker_pid "$(node_dir "$dir" "$j")")" ]] || others=$((others + 1))
  done
  ((others + 1 > n / 2)) || die "only $others other node(s) of $dir run: node $i alone has no controller quorum (use cluster-start)"
  # Its ports are in every node's controller.quorum.voters: wait a little for them, never move.
  for ((k = 0; k < 50; k++)); do
    ports_free "$p" "$c" && break
    sleep 0.2
  done
  ports_free "$p" "$c" || die "port $p or $c of node $i is taken by another process"
  cmd_install >/dev/null
  [[ -s "$dir/running" ]] || echo "$$-$(date +%s%N)" >"$dir/running"
  node_formatted "$nd" "$(cat "$dir/cluster.id")" || format_dir "$nd" "$(cat "$dir/cluster.id")"
  log_from="$(log_size "$nd/kafka.log")"
  deadline=$((SECONDS + CLUSTER_TIMEOUT))
  local t0=$SECONDS
  pid="$(launch_broker "$nd" "$CLUSTER_HEAP")"
  wait_node "$dir" "$i" "$pid" "$log_from" "$deadline" || rc=$?
  if ((rc != 0)); then
    alive "$pid" && stop_pid "$pid" "$CLUSTER_STOP_GRACE"
    rm -f "$nd/kafka.pid"
    node_tails "$nd" >&2
    die "node $i of $dir did not start"
  fi
  log "node $i (pid $pid) started in $((SECONDS - t0)) s"
  echo "127.0.0.1:$p"
}

# Wait until every node is up and no partition of any topic is under-replicated.
cmd_in_sync() {
  local dir="" timeout="$CLUSTER_TIMEOUT" out deadline t0=$SECONDS
  while (($#)); do
    case "$1" in
      --timeout) (($# >= 2)) || usage; timeout="$2"; shift 2 ;;
      --timeout=*) timeout="${1#*=}"; shift ;;
      -*) die "unknown option $1" ;;
      *) [[ -z "$dir" ]] || usage; dir="$1"; shift ;;
    esac
  done
  [[ -n "$dir" ]] || usage
  [[ "$timeout" =~ ^[0-9]+$ ]] || die "--timeout needs seconds, got '$timeout'"
  dir="$(cluster_dir "$dir")"
  deadline=$((SECONDS + timeout))
  while :; do
    if cmd_cluster_status "$dir" >/dev/null &&
      out="$(topic_command "$dir" --describe --under-replicated-partitions 2>/dev/null)" &&
      [[ -z "$(grep 'Partition:' <<<"$out" || true)" ]]; then
      log "all nodes of $dir up and every partition in sync ($((SECONDS - t0)) s)"
      return 0
    fi
    if ((SECONDS >= deadline)); then
      cmd_cluster_status "$dir" >&2 || true
      echo "${out:-}" >&2
      die "$dir not in sync after ${timeout}s"
    fi
    sleep 1
  done
}

cmd_leader() {
  local dir line
  dir="$(cluster_dir "$1")"
  line="$(describe_partitions "$dir" "$2" | awk -v p="$3" '$1 == p')" ||
    die "cannot describe topic $2"
  [[ -n "$line" ]] || die "no partition $3 of topic $2"
  read -r _ leader _ <<<"$line"
  [[ "$leader" != -1 ]] || die "partition $3 of $2 has no leader"
  echo "$leader"
}

cmd_isr() {
  local dir line
  dir="$(cluster_dir "$1")"
  line="$(describe_partitions "$dir" "$2" | awk -v p="$3" '$1 == p')" ||
    die "cannot describe topic $2"
  [[ -n "$line" ]] || die "no partition $3 of topic $2"
  read -r _ _ isr _ <<<"$line"
  echo "$isr"
}

cmd_topics() {
  local dir
  dir="$(cluster_dir "$1")"
  shift
  cmd_install >/dev/null
  topic_command "$dir" "$@"
}

cmd_elect_leaders() {
  local dir
  dir="$(cluster_dir "$1")"
  cluster_tool "$dir" org.apache.kafka.tools.LeaderElectionCommand \
    --bootstrap-server "$(cluster_bootstrap "$dir" live)" --election-type preferred \
    --all-topic-partitions
}

# The operators' rolling restart: one node at a time, only when everything is in sync.
cmd_cluster_roll() {
  local dir n i
  dir="$(cluster_dir "$1")"
  n="$(cluster_nodes "$dir")"
  for ((i = 1; i <= n; i++)); do
    cmd_in_sync "$dir"
    cmd_node_stop "$dir" "$i"
    cmd_node_start "$dir" "$i" >/dev/null
  done
  cmd_in_sync "$dir"
  cluster_bootstrap "$dir"
}

main() {
  (($# >= 1)) || usage
  local cmd="$1"
  shift
  case "$cmd" in
    install) (($# == 0)) || usage; cmd_install ;;
    start) cmd_start "$@" ;;
    stop) (($# == 1)) || usage; cmd_stop "$1" ;;
    status) (($# == 1)) || usage; cmd_status "$1" ;;
    cluster-start) cmd_cluster_start "$@" ;;
    cluster-stop) (($# == 1)) || usage; cmd_cluster_stop "$1" ;;
    cluster-status) (($# == 1)) || usage; cmd_cluster_status "$1" ;;
    cluster-roll) (($# == 1)) || usage; cmd_cluster_roll "$1" ;;
    node-start) (($# == 2)) || usage; cmd_node_start "$1" "$2" ;;
    node-stop) (($# == 2)) || usage; cmd_node_stop "$1" "$2" ;;
    node-kill) (($# == 2)) || usage; cmd_node_kill "$1" "$2" ;;
    node-disk-fail) (($# == 2 || $# == 4)) || usage; cmd_node_disk_fail "$@" ;;
    node-pid) (($# == 2)) || usage; cmd_node_pid "$1" "$2" ;;
    in-sync) cmd_in_sync "$@" ;;
    leader) (($# == 3)) || usage; cmd_leader "$1" "$2" "$3" ;;
    isr) (($# == 3)) || usage; cmd_isr "$1" "$2" "$3" ;;
    topics) (($# >= 1)) || usage; cmd_topics "$@" ;;
    elect-leaders) (($# == 1)) || usage; cmd_elect_leaders "$1" ;;
    _watch) cmd_watch "$@" ;;
    _cwatch) cmd_cwatch "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

main "$@"
