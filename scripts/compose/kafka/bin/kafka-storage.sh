#!/bin/sh
# kafka-storage.sh, as the official image has it.
KAFKA_HEAP_OPTS="-Xmx128m" exec /opt/kafka/bin/kafka-run-class.sh kafka.tools.StorageTool "$@"
