"""A Dubbo-layout consumer for the compose stack: what a Dubbo 2.7 consumer does in ZooKeeper.

It registers itself (an ephemeral ``consumer://`` URL naming its application and release under
``/dubbo/<service>/consumers``), lists the providers with a watch, prints them with the
weight Dubbo would read from each URL, and lists them again each time the watch fires, as
Dubbo's registry client does. Switched onto the mesh (``zkgate mesh set``, docker/README.md),
it prints the sidecar among its providers; switched off, the true providers again.

``--sidecar HOST:PORT`` registers that address as this host's sidecar for the service
(``/zkgate/sidecars/<host>/<service>``), standing in for a proxy that registers itself.

Runs in the zkgate image (its ZooKeeper client and Dubbo encoding):

    python /consumer/dubbo_consumer.py --zookeeper dispatcher-mesh:2181 --service demo.Echo \
        --application demo-web --release 2.7.8 --sidecar proxy:9000
"""

from __future__ import annotations

import argparse
import socket
import sys
from urllib.parse import parse_qs, unquote_plus, urlsplit

import trio

from adapters.layouts.dubbo import encode
from dispatcher.wire import parse_address
from dispatcher.zk.client import KeeperError, ZooKeeperClient
from dispatcher.zk.codec.protocol import Err
from dispatcher.zk.codec.records import WatcherEvent

EPHEMERAL = 1


def describe(names: list[str]) -> list[str]:
    """Each provider as ``host:port weight=W`` (Dubbo's default weight is 100)."""
    shown = []
    for name in sorted(names):
        url = urlsplit(unquote_plus(name))
        weight = parse_qs(url.query).get("weight", ["100"])[-1]
        sidecar = " (sidecar)" if "zkgate.sidecar" in parse_qs(url.query) else ""
        shown.append(f"{url.netloc} weight={weight}{sidecar}")
    return shown


async def ensure(client: ZooKeeperClient, path: str) -> None:
    parts = [part for part in path.split("/") if part]
    for depth in range(1, len(parts) + 1):
        prefix = "/" + "/".join(parts[:depth])
        if await client.exists(prefix) is None:
            try:
                await client.create(prefix)
            except KeeperError as exc:
                if exc.err != Err.NODEEXISTS:
                    raise


async def run(args: argparse.Namespace) -> None:
    changed = trio.Event()

    def on_watch(_event: WatcherEvent) -> None:
        changed.set()

    client = ZooKeeperClient([parse_address(args.zookeeper)], on_watch=on_watch)
    host = socket.gethostbyname(socket.gethostname())
    service = args.service
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(60):
            await client.wait_connected()
        consumers = f"/dubbo/{encode(service)}/consumers"
        await ensure(client, consumers)
        url = (
            f"consumer://{host}/{service}?application={args.application}&category=consumers"
            f"&dubbo=2.0.2&interface={service}&release={args.release}&side=consumer"
        )
        await client.create(f"{consumers}/{encode(url)}", flags=EPHEMERAL)
        print(f"registered as {args.application} on {host} (release {args.release})", flush=True)
        if args.sidecar:
            await ensure(client, f"/zkgate/sidecars/{host}")
            await client.create(
                f"/zkgate/sidecars/{host}/{service}", args.sidecar.encode(), flags=EPHEMERAL
            )
            print(f"sidecar {args.sidecar} registered for {host}", flush=True)
        providers = f"/dubbo/{encode(service)}/providers"
        while True:
            changed = trio.Event()
            try:
                names = await client.get_children(providers, watch=True)
            except KeeperError as exc:
                print(f"{providers}: {exc}; retrying", flush=True)
                await trio.sleep(2)
                continue
            print(f"providers of {service}: {', '.join(describe(names)) or 'none'}", flush=True)
            await changed.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--zookeeper", default="dispatcher-mesh:2181", metavar="HOST:PORT")
    parser.add_argument("--service", default="demo.Echo")
    parser.add_argument("--application", default="demo-web")
    parser.add_argument("--release", default="2.7.8", help="the Dubbo release it reports")
    parser.add_argument("--sidecar", metavar="HOST:PORT", help="register this host's sidecar")
    args = parser.parse_args()
    try:
        trio.run(run, args)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
