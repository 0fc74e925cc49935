#!/bin/bash
# Registers echo-zk in ZooKeeper, in zkgate's plain layout: echo tagged
# version=v1 and echo-v2 tagged version=v2 (docker/policies/canary.toml splits
# between them),
# /services/<service>/<instance id> holding {"host": ..., "port": ...}.
# Runs once in the zookeeper image (docker-compose.yml, service register-zookeeper).
set -euo pipefail

server=${ZOOKEEPER:-zookeeper:2181}

create() {
    # "Node already exists" is fine: the stack may be started again.
    output=$(zkCli.sh -server "$server" create "$1" "$2" 2>&1) || true
    if grep -q -e "Created $1" -e "Node already exists" <<<"$output"; then
        echo "zookeeper: $1 registered"
    else
        echo "zookeeper: could not create $1:" >&2
        echo "$output" >&2
        exit 1
    fi
}

create /services ""
create /services/echo-zk ""
create /services/echo-zk/echo-1 '{"host":"echo","port":5678,"metadata":{"registered-by":"compose","version":"v1"}}'
create /services/echo-zk/echo-2 '{"host":"echo-v2","port":5678,"metadata":{"registered-by":"compose","version":"v2"}}'
