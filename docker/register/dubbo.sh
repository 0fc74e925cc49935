#!/bin/bash
# Registers demo.Echo's providers in ZooKeeper in Dubbo's layout, as Dubbo 2.7
# providers do: /dubbo/<service>/providers/<URL-encoded dubbo:// URL>. The two
# instances are the stack's echo and echo-v2 (HTTP, which the demo consumer only
# lists). Runs once in the zookeeper image (docker-compose.yml, register-dubbo).
set -euo pipefail

server=${ZOOKEEPER:-zookeeper:2181}

create() {
    # "Node already exists" is fine: the stack may be started again.
    output=$(zkCli.sh -server "$server" create "$1" "" 2>&1) || true
    if grep -q -e "Created $1" -e "Node already exists" <<<"$output"; then
        echo "zookeeper: $1 registered"
    else
        echo "zookeeper: could not create $1:" >&2
        echo "$output" >&2
        exit 1
    fi
}

provider() {
    # dubbo://HOST:5678/demo.Echo?... encoded as Java's URLEncoder does.
    echo "dubbo%3A%2F%2F$1%3A5678%2Fdemo.Echo%3Fapplication%3Ddemo-provider%26interface%3Ddemo.Echo%26methods%3Decho%26release%3D2.7.8%26side%3Dprovider%26weight%3D100"
}

create /dubbo
create /dubbo/demo.Echo
create /dubbo/demo.Echo/providers
create "/dubbo/demo.Echo/providers/$(provider echo)"
create "/dubbo/demo.Echo/providers/$(provider echo-v2)"
