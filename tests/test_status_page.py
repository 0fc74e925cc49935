"""The status page in a real browser: headless Chromium (Debian's ``chromium``).

The browser is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4),
which needs no driver and no Python dependency, and lets the test read the
live page while it polls: load it once, see the service the static upstream
file registers, change the file, and see the same page (no reload) show the
change by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel

from dispatcher.gateway import Gateway, run_gateway
from tests.test_admin import BILLING, ORDERS, TwoShards, gateway_config, replace

TIMEOUT = 20.0

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # the suite runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    # This machine has no network: without these, Chromium's own background
    # connections are refused many at a time and slow every start.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-pipe",
)

#: What the test reads off the rendered page: the rows the page built, by the
#: data attributes it set, and the visible text of its tables.
READ_PAGE = """JSON.stringify({
  marker: window.zkgateTestMarker || null,
  version: document.getElementById("version").textContent,
  ready: document.getElementById("ready").textContent,
  services: [...document.querySelectorAll("#services tr.service")].map((r) => r.dataset.service),
  instances: [...document.querySelectorAll("#services tr.instance")].map(
    (r) => [r.dataset.service, r.dataset.instance, r.dataset.health]),
  upstreams: [...document.querySelectorAll("#upstreams tbody tr")].map((r) => r.innerText),
  text: document.getElementById("services").innerText,
  shards: document.getElementById("shards").innerText,
})"""


class DevTools:
    """A minimal DevTools protocol client over Chromium's debugging pipe."""

    def __init__(self, send: trio.lowlevel.FdStream, receive: trio.lowlevel.FdStream) -> None:
        self._send = send
        self._receive = receive
        self._buffer = b""
        self._next_id = 0

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._send.send_all(json.dumps(message).encode() + b"\0")
        while True:
            reply = await self._message()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            # Anything else is an event nobody here subscribed to on purpose.

    async def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = await self._receive.receive_some(65536)
            if not chunk:
                raise RuntimeError("Chromium closed its debugging pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)


@asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[DevTools]:
    """A headless Chromium with a fresh profile in ``profile``, stopped (and reaped) on exit.

    The profile is the test's (under tmp_path): Chromium's helper processes may
    still write to it for a moment after the browser itself exited.
    """
    executable = shutil.which("chromium")
    assert executable is not None, (
        "Debian's chromium is not installed (scripts/test installs it: apt-get install chromium)"
    )
    to_browser_r, to_browser_w = os.pipe()
    from_browser_r, from_browser_w = os.pipe()
    # The pipe must be the browser's descriptors 3 (commands) and 4 (replies);
    # bash, not sh: dash cannot redirect descriptors above 9.
    command = [
        "bash", "-c", f'exec "$0" "$@" 3<&{to_browser_r} 4>&{from_browser_w}',
        executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank",
    ]  # fmt: skip
    try:
        process = await trio.lowlevel.open_process(
            command,
            pass_fds=(to_browser_r, from_browser_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    finally:
        os.close(to_browser_r)
        os.close(from_browser_w)
    send = trio.lowlevel.FdStream(to_browser_w)
    receive = trio.lowlevel.FdStream(from_browser_r)
    try:
        async with send, receive:
            yield DevTools(send, receive)
    finally:
        # Closing the pipe (above) makes Chromium quit; a browser that does not
        # is killed, and either way it is reaped.
        with trio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()
            await process.wait()


async def open_page(browser: DevTools, url: str) -> str:
    """A new tab showing ``url``; returns its session id."""
    target = await browser.call("Target.createTarget", url="about:blank")
    attached = await browser.call(
        "Target.attachToTarget", targetId=target["targetId"], flatten=True
    )
    session: str = attached["sessionId"]
    await browser.call("Page.enable", session)
    await browser.call("Page.navigate", session, url=url)
    return session


async def read_page(browser: DevTools, session: str) -> dict[str, Any] | None:
    """What the page shows, or None while it is still loading (its elements missing)."""
    result = await browser.call(
        "Runtime.evaluate", session, expression=READ_PAGE, returnByValue=True
    )
    if "exceptionDetails" in result:
        return None
    return json.loads(result["result"]["value"])


async def page_until(browser: DevTools, session: str, predicate: Any, what: str) -> dict[str, Any]:
    """Read the page until ``predicate(state)`` holds (deadline TIMEOUT)."""
    state: dict[str, Any] | None = None
    with trio.move_on_after(TIMEOUT):
        while True:
            state = await read_page(browser, session)
            if state is not None and predicate(state):
                return state
            await trio.sleep(0.1)
    raise AssertionError(f"the page did not show {what} within {TIMEOUT}s; it shows {state}")


@asynccontextmanager
async def running_gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with trio.open_nursery() as nursery:
        running: Gateway = await nursery.start(run_gateway, gateway_config(tmp_path))
        try:
            yield running
        finally:
            nursery.cancel_scope.cancel()


async def test_the_status_page_shows_a_registered_service_and_follows_changes(
    tmp_path: Path,
) -> None:
    replace(tmp_path / "services.toml", ORDERS)
    with trio.fail_after(60):
        async with running_gateway(tmp_path) as gateway, chromium(tmp_path / "chromium") as browser:
            admin = gateway.admin
            assert admin is not None and admin.port is not None
            session = await open_page(browser, f"http://127.0.0.1:{admin.port}/")

            first = await page_until(
                browser, session, lambda s: s["services"] == ["orders"], "the orders service"
            )
            assert first["instances"] == [
                ["orders", "10.0.0.7:8080", "passing"],
                ["orders", "10.0.0.8:8080", "failing"],
            ]
            assert "10.0.0.7:8080" in first["text"] and "failing" in first["text"]
            assert "version=1.4.2" in first["text"]  # metadata is shown
            assert first["ready"] == "yes"
            assert len(first["upstreams"]) == 1 and "connected" in first["upstreams"][0]
            assert "Sharding is off" in first["shards"]
            # Mark this document: a reload would lose the mark.
            await browser.call(
                "Runtime.evaluate", session, expression="window.zkgateTestMarker = 'same page'"
            )

            # A new service, and one instance turning healthy: the page follows by itself.
            changed = ORDERS.replace('health = "failing"', 'health = "passing"') + BILLING
            replace(tmp_path / "services.toml", changed)
            second = await page_until(
                browser, session, lambda s: "billing" in s["services"], "the billing service"
            )
            assert second["marker"] == "same page"
            assert second["services"] == ["billing", "orders"]
            assert ["orders", "10.0.0.8:8080", "passing"] in second["instances"]
            assert ["billing", "10.0.1.1:9000", "unknown"] in second["instances"]
            assert int(second["version"]) > int(first["version"])

            # The upstream going away shows as stale, with the last state kept.
            (tmp_path / "services.toml").unlink()
            third = await page_until(
                browser, session, lambda s: "stale" in s["upstreams"][0], "the stale upstream"
            )
            assert third["services"] == ["billing", "orders"]

            # One page load, then only the page's own polling.
            assert admin.served["/"] == 1
            assert admin.served["/snapshot"] >= 2
            await browser.call("Browser.close")


READ_SHARDS = """JSON.stringify({
  members: [...document.querySelectorAll("#members tr[data-member]")].map((r) => r.innerText),
  owners: [...document.querySelectorAll("#owners tr[data-owned]")].map(
    (r) => [r.dataset.owned, r.cells[1].innerText]),
})"""


async def test_the_status_page_shows_the_shard_map(tmp_path: Path) -> None:
    replace(tmp_path / "services.toml", ORDERS + BILLING)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, chromium(tmp_path / "chromium") as browser:
            sharded = Gateway(gateway_config(tmp_path), ownership=TwoShards())
            await nursery.start(sharded.run)
            assert sharded.admin is not None
            session = await open_page(browser, f"http://127.0.0.1:{sharded.admin.port}/")
            await page_until(browser, session, lambda s: len(s["services"]) == 2, "both services")
            result = await browser.call(
                "Runtime.evaluate", session, expression=READ_SHARDS, returnByValue=True
            )
            shards = json.loads(result["result"]["value"])
            assert len(shards["members"]) == 1
            assert shards["members"][0].split("\t") == [
                "gw-2",
                "10.1.0.2:9200",
                "10.1.0.2:2181",
                "1",
            ]
            assert shards["owners"] == [["billing", "nobody"], ["orders", "gw-2"]]
            await browser.call("Browser.close")
            nursery.cancel_scope.cancel()
