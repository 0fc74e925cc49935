"""The status page's mesh console in headless Chromium, against real clients (issue #18, item 5).

Real ZooKeeper 3.8 is the upstream and the governance store, ``zkgate serve`` runs as a child
process (the fixture of :mod:`tests.test_mesh`), and the consumers are kazoo clients that
register and read as Dubbo does. The browser is driven as :mod:`tests.test_status_page`
drives it; the test types the token into the page, presses the page's own switch, moves its
slider, and checks what the consumer reads through zkgate.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from tests.servers import ZkgateServer
from tests.test_mesh import (
    PROVIDERS,
    SIDECAR_A,
    TOKEN,
    DubboConsumer,
    _admin,
    _weights,
    mesh_setup,  # noqa: F401  (the fixture, used by name)
    until,
)
from tests.test_status_page import chromium, open_page

TIMEOUT = 30.0

READ_MESH = """JSON.stringify({
  version: (document.getElementById("mesh-version") || {dataset: {}}).dataset.version || null,
  switches: [...document.querySelectorAll("#mesh-consumers tr.mesh-switch")].map((r) => ({
    application: r.dataset.application, service: r.dataset.service, mode: r.dataset.mode,
    ratio: Number(r.dataset.ratio), text: r.innerText})),
  instances: [...document.querySelectorAll("#mesh-consumers tr.mesh-instance")].map((r) => ({
    application: r.dataset.application, host: r.dataset.host, refused: r.dataset.refused,
    text: r.innerText})),
  message: document.getElementById("mesh-message").textContent,
  rollback: document.getElementById("mesh-rollback").textContent,
})"""


async def evaluate(browser: Any, session: str, expression: str) -> Any:
    result = await browser.call(
        "Runtime.evaluate", session, expression=expression, returnByValue=True
    )
    assert "exceptionDetails" not in result, result["exceptionDetails"]
    return result["result"].get("value")


async def mesh_until(browser: Any, session: str, predicate: Any, what: str) -> dict[str, Any]:
    """Read the console until ``predicate(state)`` holds (deadline TIMEOUT)."""
    state: dict[str, Any] | None = None
    with trio.move_on_after(TIMEOUT):
        while True:
            result = await browser.call(
                "Runtime.evaluate", session, expression=READ_MESH, returnByValue=True
            )
            if "exceptionDetails" not in result:
                state = json.loads(result["result"]["value"])
                if predicate(state):
                    return state
            await trio.sleep(0.1)
    raise AssertionError(f"the console did not show {what} within {TIMEOUT}s; it shows {state}")


def _switch_row(state: dict[str, Any], application: str) -> dict[str, Any] | None:
    return next((s for s in state["switches"] if s["application"] == application), None)


SWITCH = "#mesh-consumers tr.mesh-switch[data-application='web']"
TOGGLE = f'document.querySelector("{SWITCH} button").click()'
TYPE_TOKEN = 'document.getElementById("mesh-token").value = "%s"'


async def test_the_console_switches_a_consumer_and_moves_its_ratio(
    mesh_setup: tuple[str, ZkgateServer],  # noqa: F811
    tmp_path: Any,
) -> None:
    admin, server = mesh_setup
    true_hosts = {f"{host}:{port}" for host, port, _ in PROVIDERS}
    web = await trio.to_thread.run_sync(DubboConsumer, server.address, "127.0.0.1", "web", "2.7.8")
    old = await trio.to_thread.run_sync(
        DubboConsumer, server.address, "127.0.0.2", "legacy", "2.6.5"
    )

    def providers_read() -> bool:
        return set(_weights(web.providers()[0])) == true_hosts

    async def web_sees(expected: dict[str, int], events: int) -> None:
        """The consumer's watch fires, and its re-read (re-arming the watch, as Dubbo does)
        shows ``expected``."""

        def fired() -> bool:
            return web.events >= events

        await trio.to_thread.run_sync(until, fired, f"watch event {events}", TIMEOUT)
        urls, _ = await trio.to_thread.run_sync(web.providers)
        assert _weights(urls) == expected

    try:
        # Read once with a watch, as Dubbo does: the providers are the registry's.
        await trio.to_thread.run_sync(until, providers_read, "the providers projected", TIMEOUT)
        old.providers()
        with trio.fail_after(120):
            async with chromium(tmp_path / "chromium") as browser:
                session = await open_page(browser, f"http://{admin}/")
                first = await mesh_until(
                    browser, session,
                    lambda s: _switch_row(s, "web") is not None and any(
                        i["application"] == "legacy" for i in s["instances"]),
                    "the consumers",
                )  # fmt: skip
                row = _switch_row(first, "web")
                assert row is not None and row["mode"] == "off" and row["service"] == "shop.Cart"
                legacy = next(i for i in first["instances"] if i["application"] == "legacy")
                # The version check, refused with its reason.
                assert legacy["refused"] == "dubbo 2.6.5 is below the minimum 2.7.8"
                assert "refused" in legacy["text"]

                # Without the right token the page's write is refused, and says by whom.
                await evaluate(browser, session, TYPE_TOKEN % "wrong")
                await evaluate(browser, session, TOGGLE)
                refused = await mesh_until(
                    browser, session, lambda s: "refused" in s["message"], "the refusal"
                )
                assert "HTTP 401" in refused["message"] and "mesh writes" in refused["message"]
                assert _admin(admin, "GET", "/mesh")[1]["version"] == 0

                # Switched on (the slider starts at 100): the consumer sees its sidecar alone.
                await evaluate(browser, session, TYPE_TOKEN % TOKEN)
                await evaluate(browser, session, TOGGLE)
                await web_sees({SIDECAR_A: 100}, 1)
                on = await mesh_until(
                    browser, session, lambda s: (_switch_row(s, "web") or {}).get("mode") == "on",
                    "the consumer switched on",
                )  # fmt: skip
                assert _switch_row(on, "web")["ratio"] == 100  # type: ignore[index]
                assert "127.0.0.1: on" in _switch_row(on, "web")["text"]  # type: ignore[index]

                # The slider moved to 30: the true providers plus the sidecar at 30/70 of them.
                await evaluate(
                    browser,
                    session,
                    f"""(() => {{
                    const slider = document.querySelector("{SWITCH} input.mesh-ratio");
                    slider.value = "30";
                    slider.dispatchEvent(new Event("input"));
                    slider.dispatchEvent(new Event("change"));
                }})()""",
                )
                await web_sees({**dict.fromkeys(true_hosts, 100), SIDECAR_A: 86}, 2)
                moved = await mesh_until(
                    browser, session, lambda s: (_switch_row(s, "web") or {}).get("ratio") == 30,
                    "the ratio at 30",
                )  # fmt: skip
                assert moved["version"] == "2"

                # A rollback to version 1 shows on the console with its reason.
                status, answer = _admin(admin, "POST", "/mesh/rollback", {
                    "to_version": 1, "expected_version": 2, "why": "sidecar resets connections",
                })  # fmt: skip
                assert status == 200, answer
                await web_sees({SIDECAR_A: 100}, 3)
                rolled = await mesh_until(
                    browser, session, lambda s: "sidecar resets connections" in s["rollback"],
                    "the last rollback",
                )  # fmt: skip
                assert "restores version 1" in rolled["rollback"]
                assert (_switch_row(rolled, "web") or {}).get("ratio") == 100

                # The consumer below the minimum version saw nothing of this.
                assert old.events == 0
                assert set(_weights(old.providers(watch=False)[0])) == true_hosts
                await browser.call("Browser.close")
        # The token typed into the page reached no log.
        assert TOKEN not in server.log_path.read_text(errors="replace")
    finally:
        for consumer in (web, old):
            await trio.to_thread.run_sync(consumer.stop)
