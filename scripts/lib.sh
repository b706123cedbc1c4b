# shellcheck shell=bash disable=SC2034  # variables here are used by the sourcing scripts
# Shared helpers for scripts/stack and scripts/kafka-tool. Source it; don't run it.
#
# All state lives outside the repo so `git clean` never eats a running broker's data:
#   $USER_SERVICE_HOME/kafka/libs   Kafka + log4j jars fetched by Maven (cached across stacks)
#   $USER_SERVICE_HOME/stack/       data, logs, pid files of the local Redis and Kafka

SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_SCRIPTS_DIR="$SCRIPTS_DIR/kafka"

USER_SERVICE_HOME="${USER_SERVICE_HOME:-$HOME/.cache/user-service}"
STACK_DIR="$USER_SERVICE_HOME/stack"
# Redis settings the read model's layout wants (src/store/keys.rs): a bucket
# of users stays a compact listpack only while each value fits
# hash-max-listpack-value, whose default (64 bytes) is less than most users.
# shellcheck disable=SC2034  # used by the scripts that source this file
REDIS_LAYOUT_ARGS="--hash-max-listpack-value 1024"
KAFKA_LIBS="$USER_SERVICE_HOME/kafka/libs"

# Default Kafka version is the one in scripts/kafka/pom.xml; $KAFKA_VERSION overrides it.
KAFKA_VERSION="${KAFKA_VERSION:-$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_SCRIPTS_DIR/pom.xml")}"

log() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# apt-get update at most once per run, and only when something is actually missing.
_APT_UPDATED=0
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ "$_APT_UPDATED" -eq 0 ]; then
    log "apt-get update"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    _APT_UPDATED=1
  fi
  log "apt-get install -y $*"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Use-Pty=0 "$@" >&2
}

# ensure_cmd COMMAND DEBIAN_PACKAGE: install the package if the command is not on PATH.
ensure_cmd() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$2"
  command -v "$1" >/dev/null 2>&1 || die "'$1' still missing after installing $2"
}

# What the crates need to build beyond Rust itself: rdkafka compiles librdkafka
# with TLS and SASL/SCRAM against the system's OpenSSL (found by pkg-config).
ensure_build_deps() {
  local missing=() p
  for p in libssl-dev pkg-config; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
}

ensure_java() {
  ensure_cmd java openjdk-17-jre-headless
}

# Fetch the Kafka jars into $KAFKA_LIBS unless a complete copy for this exact
# version + pom is already there (a stamp file is written last, so an interrupted
# download is redone instead of leaving a half classpath).
ensure_kafka_libs() {
  ensure_java
  local stamp="$KAFKA_LIBS/.stamp"
  local want
  want="kafka=$KAFKA_VERSION pom=$(sha256sum "$KAFKA_SCRIPTS_DIR/pom.xml" | cut -c1-16)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    return 0
  fi
  ensure_cmd mvn maven
  mkdir -p "$USER_SERVICE_HOME/kafka"
  # Serialise concurrent fetches (e.g. two test runs starting at once).
  (
    flock -w 600 8 || die "timed out waiting for $USER_SERVICE_HOME/kafka/.lock"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
    log "fetching Apache Kafka $KAFKA_VERSION jars with Maven into $KAFKA_LIBS"
    local tmp="$KAFKA_LIBS.tmp.$$"
    rm -rf "$tmp"
    # Output to a file (Maven 3.8 -q still prints stray ANSI codes); shown on failure.
    # ~/.m2 stays the Maven cache.
    local mvnlog="$USER_SERVICE_HOME/kafka/mvn.log"
    if ! mvn -q -B -Dstyle.color=never -f "$KAFKA_SCRIPTS_DIR/pom.xml" \
        -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DoutputDirectory="$tmp" >"$mvnlog" 2>&1; then
      tail -n 40 "$mvnlog" >&2
      rm -rf "$tmp"
      die "Maven could not fetch org.apache.kafka:kafka_2.13:$KAFKA_VERSION (log: $mvnlog)"
    fi
    [ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ] || die "kafka_2.13-$KAFKA_VERSION.jar missing after fetch"
    echo "$want" >"$tmp/.stamp"
    rm -rf "$KAFKA_LIBS"
    mv "$tmp" "$KAFKA_LIBS"
  ) 8>"$USER_SERVICE_HOME/kafka/.lock"
}

# Kafka version actually on the classpath (from the broker jar's file name).
kafka_libs_version() {
  local jars=("$KAFKA_LIBS"/kafka_2.13-*.jar) jar
  jar="${jars[0]}"
  [ -f "$jar" ] || { echo "not fetched"; return 0; }
  jar="${jar##*/kafka_2.13-}"
  echo "${jar%.jar}"
}

# Short names for the Kafka CLI classes (the kafka-*.sh scripts of the tarball).
kafka_tool_class() {
  case "$1" in
    topics) echo org.apache.kafka.tools.TopicCommand ;;
    consumer-groups) echo org.apache.kafka.tools.consumer.group.ConsumerGroupCommand ;;
    producer-perf) echo org.apache.kafka.tools.ProducerPerformance ;;
    consumer-perf) echo org.apache.kafka.tools.ConsumerPerformance ;;
    e2e-latency) echo org.apache.kafka.tools.EndToEndLatency ;;
    api-versions) echo org.apache.kafka.tools.BrokerApiVersionsCommand ;;
    console-producer) echo org.apache.kafka.tools.ConsoleProducer ;;
    console-consumer) echo org.apache.kafka.tools.consumer.ConsoleConsumer ;;
    get-offsets) echo org.apache.kafka.tools.GetOffsetShell ;;
    metadata-quorum) echo org.apache.kafka.tools.MetadataQuorumCommand ;;
    configs) echo org.apache.kafka.tools.ConfigCommand ;; # kafka.admin.ConfigCommand in 4.1 and older
    delete-records) echo org.apache.kafka.tools.DeleteRecordsCommand ;;
    storage) echo kafka.tools.StorageTool ;;
    *.*) echo "$1" ;; # already a fully qualified class name
    *) return 1 ;;
  esac
}

KAFKA_TOOL_ALIASES="topics consumer-groups producer-perf consumer-perf e2e-latency api-versions console-producer console-consumer get-offsets metadata-quorum configs delete-records storage"

# kafka_class_cmd [JVM_OPTS...] -- CLASS ARGS...: set the array KAFKA_CMD to the java
# command running a Kafka main class on the cached classpath. Tool logs go to stderr at
# WARN (tools-log4j2.xml), so stdout carries only the tool's output.
kafka_class_cmd() {
  local jvm=()
  while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do jvm+=("$1"); shift; done
  [ "$#" -gt 0 ] && shift
  # shellcheck disable=SC2206  # KAFKA_TOOL_OPTS is a space-separated list of JVM flags
  local opts=(${KAFKA_TOOL_OPTS:--Xmx512m -XX:+UseSerialGC})
  KAFKA_CMD=(java "${opts[@]}" "${jvm[@]}"
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$KAFKA_SCRIPTS_DIR/tools-log4j2.xml"
    -cp "$KAFKA_LIBS/*" "$@")
}

# free_port: a loopback TCP port nothing listens on right now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# cargo_target_dir: where cargo puts builds for this repo ($CARGO_TARGET_DIR or ./target).
cargo_target_dir() {
  (cd "$SCRIPTS_DIR/.." && cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
}

# jaeger_config OTLP_PORT QUERY_PORT QUERY_GRPC_PORT: Jaeger all-in-one's
# configuration (v2, an OpenTelemetry Collector), on stdout: OTLP/gRPC in,
# traces kept in memory, every port of its own (its defaults are fixed ports).
jaeger_config() {
  cat <<EOF
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:$2
    grpc:
      endpoint: 127.0.0.1:$3
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$1
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
EOF
}
