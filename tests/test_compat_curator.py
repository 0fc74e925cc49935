"""Apache Curator 5.4 (Debian's libcurator-*-java) against zkgate and real ZooKeeper.

Curator is what most JVM services use to talk to ZooKeeper, and zkgate's users
point it at zkgate by changing nothing but the connect string. The program
``tests/compat/CuratorCompat.java`` exercises what those services rely on:
CuratorFramework's create with container parents and its watches (one-shot,
background, persistent recursive), CuratorCache, InterProcessMutex under
contention, LeaderLatch, DistributedAtomicLong, ServiceDiscovery (register,
query, provider, cache, session end) and transactions. It is compiled once per
session with the JDK's ``javac`` against Debian's jars and run once per
scenario and server; each check it prints is asserted here by name, and the
same checks against real ZooKeeper are the proof that the checks are right.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.compat.harness import (
    TARGET_KINDS,
    Target,
    compile_java,
    curator_classpath,
    failed_checks,
    make_target,
    parse_report,
    run_client,
)

SOURCE = Path(__file__).parent / "compat" / "CuratorCompat.java"

LOGGING_JAR = "/usr/share/java/slf4j-simple.jar"

#: Every check each scenario must print ``OK`` for, in the program's order.
CHECKS: dict[str, tuple[str, ...]] = {
    "framework": (
        "create_returns_path",
        "create_data",
        "parent_containers_created",
        "leaf_is_persistent",
        "data_watch_fires",
        "set_data_version",
        "data_watch_is_one_shot",
        "set_data_bad_version",
        "children_empty",
        "exists_absent",
        "child_watch_fires",
        "exists_watch_fires",
        "delete_watch_fires",
        "persistent_recursive_watch",
        "background_get_data",
        "protected_ephemeral_sequential",
        "ephemeral_owner_is_session",
        "sync",
        "delete_deleting_children",
    ),
    "cache": (
        "initialized",
        "initial_load",
        "create_event",
        "change_event",
        "deep_create_event",
        "deep_delete_event",
        "delete_event",
        "cache_get",
        "cache_size",
        "no_extra_events",
    ),
    "mutex": (
        "acquire",
        "excludes_other_client",
        "reentrant",
        "still_held_after_one_release",
        "other_client_acquires_after_release",
        "contention_no_overlap",
        "contention_no_timeouts",
        "contention_counter",
        "lock_nodes_cleaned_up",
    ),
    "leader": (
        "first_becomes_leader",
        "listener_told_leader",
        "participants",
        "only_one_leader",
        "both_see_same_leader",
        "leadership_passes_on_close",
        "second_has_leadership",
        "one_participant_left",
    ),
    "atomic": (
        "initialize",
        "initialize_only_once",
        "concurrent_increments_succeed",
        "get",
        "concurrent_increments_total",
        "compare_and_set",
        "compare_and_set_stale",
        "add",
        "decrement",
        "value_is_8_bytes",
    ),
    "discovery": (
        "query_for_names",
        "query_for_instances",
        "query_for_instance",
        "registration_is_curator_json",
        "registration_is_ephemeral",
        "service_provider",
        "service_cache_instances",
        "service_cache_sees_update",
        "unregister",
        "session_end_removes_instances",
        "service_cache_listener_fired",
        "query_after_session_end",
    ),
    "transaction": (
        "result_types",
        "sequential_result_path",
        "set_data_result_stat",
        "committed_create",
        "committed_set",
        "committed_delete",
        "failed_transaction_throws",
        "failed_transaction_results",
        "failed_transaction_rolled_back",
    ),
}

#: The program gives each scenario 45 s of its own; this only catches a wedged JVM.
RUN_TIMEOUT = 90.0


@pytest.fixture(scope="session")
def curator_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CuratorCompat compiled once per session."""
    return compile_java(SOURCE, tmp_path_factory.mktemp("curator-classes"), LOGGING_JAR)


@pytest.fixture(params=TARGET_KINDS)
def target(request: pytest.FixtureRequest, unique_path: str) -> Target:
    return make_target(request, request.param, unique_path)


@pytest.mark.parametrize("scenario", list(CHECKS))
def test_curator(scenario: str, target: Target, curator_classes: Path) -> None:
    command = [
        "java",
        "-Xmx256m",
        "-XX:+UseSerialGC",
        "-XX:TieredStopAtLevel=1",
        "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
        "-cp",
        curator_classpath(str(curator_classes), LOGGING_JAR),
        "CuratorCompat",
        target.address,
        target.base,
        scenario,
    ]
    run = run_client(command, timeout=RUN_TIMEOUT)
    problems = failed_checks(parse_report(run.stdout), CHECKS[scenario], scenario)
    assert not problems, (
        f"Curator {scenario} against {target.describe()}:\n  "
        + "\n  ".join(problems)
        + f"\n{run.tail()}"
    )
    assert run.returncode == 0, f"CuratorCompat exited {run.returncode}\n{run.tail()}"
