#!/bin/sh
# kafka-broker-api-versions.sh, as the official image has it.
KAFKA_HEAP_OPTS="-Xmx128m" exec /opt/kafka/bin/kafka-run-class.sh org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
