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
# Environment:
#   FRACTURE_CACHE           cache folder (default $HOME/.cache/fracture)
#   FRACTURE_KAFKA_VERSION   org.apache.kafka:kafka_2.13 version (default below)
#   FRACTURE_KAFKA_TIMEOUT   seconds to wait for readiness (default 90)
#   FRACTURE_KAFKA_LOG_LEVEL root log level in DIR/kafka.log (default INFO)
#   FRACTURE_KAFKA_HEAP      JVM heap flags (default "-Xms256m -Xmx1g")
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

# Two distinct free loopback ports: "PORT CONTROLLER_PORT".
free_ports() {
  command -v python3 >/dev/null 2>&1 || die "python3 is needed to pick free ports"
  python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
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
  local logfile
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

stop_pid() {
  local pid="$1" i
  alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_GRACE * 10; i++)); do
    alive "$pid" || return 0
    sleep 0.1
  done
  log "broker $pid still up after ${STOP_GRACE}s: SIGKILL"
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
  local java
  java="$(java_bin)"
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

    local jvm_common=(-Dlog4j2.configurationFile="$dir/log4j2.xml" -Dkafka.logs.dir="$dir"
      -Djava.awt.headless=true -cp "$LIBS/*")
    if ! "$java" -Xmx256m "${jvm_common[@]}" kafka.tools.StorageTool format --ignore-formatted \
      -t "$cid" -c "$dir/server.properties" >"$dir/format.log" 2>&1; then
      cat "$dir/format.log" >&2
      die "formatting $dir/data failed"
    fi

    rm -f "$dir/kafka.pid" "$dir/bootstrap"
    local heap
    read -r -a heap <<<"$HEAP"
    # Only what this attempt logs counts when looking for a port clash below.
    local log_from out_from
    log_from=$(($(stat -c %s "$dir/kafka.log" 2>/dev/null || echo 0) + 1))
    out_from=$(($(stat -c %s "$dir/kafka.out" 2>/dev/null || echo 0) + 1))
    local t0=$SECONDS
    # setsid -f: own session, survives this script and its terminal; the shell writes its pid
    # and then becomes the JVM, so kafka.pid is the JVM's pid.
    # shellcheck disable=SC2016
    setsid -f bash -c 'echo $$ >"$1/kafka.pid.tmp" && mv "$1/kafka.pid.tmp" "$1/kafka.pid"; shift; exec "$@"' \
      _ "$dir" nohup "$java" "${heap[@]}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
      -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
      -XX:+ExitOnOutOfMemoryError "${jvm_common[@]}" kafka.Kafka "$dir/server.properties" \
      </dev/null >>"$dir/kafka.out" 2>&1

    local i
    pid=""
    for ((i = 0; i < 100; i++)); do
      [[ -s "$dir/kafka.pid" ]] && { pid="$(cat "$dir/kafka.pid")"; break; }
      sleep 0.05
    done
    [[ -n "$pid" ]] || die "the broker did not start (see $dir/kafka.out)"

    [[ -z "$watch" ]] || start_watchdog "$dir" "$watch" "$pid"

    local ready=0
    while ((SECONDS - t0 < READY_TIMEOUT)); do
      if ! alive "$pid"; then
        break
      fi
      # The port answering is not enough (another process may have taken it meanwhile): the
      # JVM must also have logged that it started (KafkaRaftServer logs at INFO, see log4j2.xml).
      if tail -c +"$log_from" "$dir/kafka.log" 2>/dev/null | grep -q 'Kafka Server started' &&
        tcp_open "$port"; then
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
      { tail -c +"$log_from" "$dir/kafka.log" 2>/dev/null; tail -c +"$out_from" "$dir/kafka.out" 2>/dev/null; } |
      grep -q -e 'BindException' -e 'Address already in use'; then
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

main() {
  (($# >= 1)) || usage
  local cmd="$1"
  shift
  case "$cmd" in
    install) (($# == 0)) || usage; cmd_install ;;
    start) cmd_start "$@" ;;
    stop) (($# == 1)) || usage; cmd_stop "$1" ;;
    status) (($# == 1)) || usage; cmd_status "$1" ;;
    _watch) cmd_watch "$@" ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

main "$@"
