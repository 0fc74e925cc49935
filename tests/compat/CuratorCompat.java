/*
 * Apache Curator 5.4 (Debian's libcurator-*-java) against a ZooKeeper server.
 *
 * Usage: java CuratorCompat CONNECT_STRING BASE_PATH [SCENARIO...]
 *
 * Runs each named scenario (all of them if none is named) under its own path
 * BASE_PATH/SCENARIO and prints one line per check, "OK scenario.check" or
 * "FAIL scenario.check: why", then exits 1 if any check failed. A scenario
 * that throws or overruns its deadline prints "FAIL scenario: why" and the
 * checks it did not reach are simply missing: the Python side
 * (tests/test_compat_curator.py) knows which checks every scenario must print.
 *
 * The same program runs against real ZooKeeper 3.8 and against zkgate; real
 * ZooKeeper is the reference, so a check that fails there is a wrong check.
 * Every wait has a deadline; nothing sleeps in place of a condition.
 */

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collection;
import java.util.HashSet;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import java.util.concurrent.atomic.AtomicInteger;

import org.apache.curator.framework.CuratorFramework;
import org.apache.curator.framework.CuratorFrameworkFactory;
import org.apache.curator.framework.api.CuratorWatcher;
import org.apache.curator.framework.api.transaction.CuratorTransactionResult;
import org.apache.curator.framework.api.transaction.OperationType;
import org.apache.curator.framework.recipes.atomic.AtomicValue;
import org.apache.curator.framework.recipes.atomic.DistributedAtomicLong;
import org.apache.curator.framework.recipes.cache.CuratorCache;
import org.apache.curator.framework.recipes.cache.CuratorCacheListener;
import org.apache.curator.framework.recipes.leader.LeaderLatch;
import org.apache.curator.framework.recipes.leader.LeaderLatchListener;
import org.apache.curator.framework.recipes.locks.InterProcessMutex;
import org.apache.curator.retry.ExponentialBackoffRetry;
import org.apache.curator.retry.RetryNTimes;
import org.apache.curator.x.discovery.ServiceCache;
import org.apache.curator.x.discovery.ServiceDiscovery;
import org.apache.curator.x.discovery.ServiceDiscoveryBuilder;
import org.apache.curator.x.discovery.ServiceInstance;
import org.apache.curator.x.discovery.ServiceProvider;
import org.apache.curator.x.discovery.details.JsonInstanceSerializer;
import org.apache.curator.x.discovery.details.ServiceCacheListener;
import org.apache.curator.framework.state.ConnectionState;
import org.apache.zookeeper.AddWatchMode;
import org.apache.zookeeper.CreateMode;
import org.apache.zookeeper.KeeperException;
import org.apache.zookeeper.OpResult;
import org.apache.zookeeper.WatchedEvent;
import org.apache.zookeeper.Watcher.Event.EventType;
import org.apache.zookeeper.data.Stat;

public final class CuratorCompat {
    /** How long any single expected event or state may take to show up. */
    static final long WAIT_MS = 10_000;
    /** How long one whole scenario may take before it is reported as hung. */
    static final long SCENARIO_MS = 45_000;

    static final Map<String, Scenario> SCENARIOS = new LinkedHashMap<>();

    static {
        SCENARIOS.put("framework", CuratorCompat::framework);
        SCENARIOS.put("cache", CuratorCompat::cache);
        SCENARIOS.put("mutex", CuratorCompat::mutex);
        SCENARIOS.put("leader", CuratorCompat::leader);
        SCENARIOS.put("atomic", CuratorCompat::atomic);
        SCENARIOS.put("discovery", CuratorCompat::discovery);
        SCENARIOS.put("transaction", CuratorCompat::transaction);
    }

    interface Scenario {
        void run(Context ctx) throws Exception;
    }

    /** What a scenario gets: where to work, how to make clients, how to report. */
    static final class Context {
        final String connect;
        final String base;
        final String scenario;
        final List<CuratorFramework> clients = new ArrayList<>();
        final List<AutoCloseable> closeables = new ArrayList<>();
        int failures = 0;

        Context(String connect, String base, String scenario) {
            this.connect = connect;
            this.base = base;
            this.scenario = scenario;
        }

        CuratorFramework client() throws InterruptedException {
            // The test servers grant at most 20 ticks of 200 ms; asking for that
            // keeps Curator's idea of the session in line with the server's.
            CuratorFramework client = CuratorFrameworkFactory.builder()
                    .connectString(connect)
                    .sessionTimeoutMs(4_000)
                    .connectionTimeoutMs(3_000)
                    .retryPolicy(new ExponentialBackoffRetry(100, 5))
                    .build();
            client.start();
            if (!client.blockUntilConnected((int) WAIT_MS, TimeUnit.MILLISECONDS)) {
                client.close();
                throw new IllegalStateException("client did not connect to " + connect);
            }
            clients.add(client);
            return client;
        }

        <T extends AutoCloseable> T closeLater(T closeable) {
            closeables.add(closeable);
            return closeable;
        }

        void check(String name, boolean ok, String why) {
            if (ok) {
                System.out.println("OK " + scenario + "." + name);
            } else {
                failures++;
                System.out.println("FAIL " + scenario + "." + name + ": " + why);
            }
            System.out.flush();
        }

        void checkEquals(String name, Object expected, Object actual) {
            check(name, expected == null ? actual == null : expected.equals(actual),
                    "expected " + expected + ", got " + actual);
        }

        void closeAll() {
            for (int i = closeables.size() - 1; i >= 0; i--) {
                quietly(closeables.get(i));
            }
            for (CuratorFramework client : clients) {
                quietly(client);
            }
        }
    }

    // ------------------------------------------------------------------ helpers

    static byte[] bytes(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    static String str(byte[] b) {
        return b == null ? null : new String(b, StandardCharsets.UTF_8);
    }

    static void quietly(AutoCloseable closeable) {
        try {
            closeable.close();
        } catch (Exception | Error ignored) {
            // Closing after a failure may fail again; the failure is already reported.
        }
    }

    /** A one-shot or persistent watcher that queues every event it is given. */
    static final class Events implements CuratorWatcher {
        final BlockingQueue<WatchedEvent> queue = new LinkedBlockingQueue<>();

        @Override
        public void process(WatchedEvent event) {
            queue.add(event);
        }

        WatchedEvent next() throws InterruptedException {
            return queue.poll(WAIT_MS, TimeUnit.MILLISECONDS);
        }

        static String describe(WatchedEvent event) {
            return event == null ? "no event within " + WAIT_MS + " ms"
                    : event.getType() + " " + event.getPath();
        }

        static boolean is(WatchedEvent event, EventType type, String path) {
            return event != null && event.getType() == type && path.equals(event.getPath());
        }
    }

    static <T> T poll(BlockingQueue<T> queue) throws InterruptedException {
        return queue.poll(WAIT_MS, TimeUnit.MILLISECONDS);
    }

    interface Condition {
        boolean holds() throws Exception;
    }

    /** Polls a condition that another process (the server) makes true, with a deadline. */
    static boolean eventually(Condition condition) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(WAIT_MS);
        while (true) {
            if (condition.holds()) {
                return true;
            }
            if (System.nanoTime() > deadline) {
                return false;
            }
            Thread.sleep(20);
        }
    }

    // ------------------------------------------------------- framework basics

    /** CuratorFramework: container parents, one-shot and persistent watches, background calls. */
    static void framework(Context ctx) throws Exception {
        CuratorFramework c = ctx.client();
        String root = ctx.base;

        String leaf = root + "/parents/a/b/leaf";
        String created = c.create().creatingParentContainersIfNeeded().forPath(leaf, bytes("v1"));
        ctx.checkEquals("create_returns_path", leaf, created);
        ctx.checkEquals("create_data", "v1", str(c.getData().forPath(leaf)));
        // A container is invisible in a client's Stat (ZooKeeper reports its
        // ephemeralOwner as 0), so only its existence can be checked here.
        Stat parent = c.checkExists().forPath(root + "/parents/a/b");
        ctx.check("parent_containers_created", parent != null && parent.getEphemeralOwner() == 0,
                "parent " + root + "/parents/a/b: " + parent);
        Stat leafStat = c.checkExists().forPath(leaf);
        ctx.check("leaf_is_persistent", leafStat != null && leafStat.getEphemeralOwner() == 0,
                "leaf stat " + leafStat);

        // One-shot data watch: fires once on setData.
        Events dataWatch = new Events();
        c.getData().usingWatcher(dataWatch).forPath(leaf);
        Stat afterSet = c.setData().forPath(leaf, bytes("v2"));
        WatchedEvent event = dataWatch.next();
        ctx.check("data_watch_fires", Events.is(event, EventType.NodeDataChanged, leaf), Events.describe(event));
        ctx.checkEquals("set_data_version", 1, afterSet.getVersion());
        c.setData().forPath(leaf, bytes("v3"));
        ctx.check("data_watch_is_one_shot", dataWatch.queue.poll(300, TimeUnit.MILLISECONDS) == null,
                "a second event arrived on a one-shot watch");

        try {
            c.setData().withVersion(0).forPath(leaf, bytes("stale"));
            ctx.check("set_data_bad_version", false, "setData with a stale version succeeded");
        } catch (KeeperException.BadVersionException expected) {
            ctx.check("set_data_bad_version", true, "");
        }

        // Child watch and exists watch.
        String dir = root + "/dir";
        c.create().forPath(dir);
        Events childWatch = new Events();
        ctx.checkEquals("children_empty", List.of(), c.getChildren().usingWatcher(childWatch).forPath(dir));
        Events existsWatch = new Events();
        ctx.check("exists_absent", c.checkExists().usingWatcher(existsWatch).forPath(dir + "/x") == null,
                "exists on a missing node returned a stat");
        c.create().forPath(dir + "/x", bytes("x"));
        event = childWatch.next();
        ctx.check("child_watch_fires", Events.is(event, EventType.NodeChildrenChanged, dir), Events.describe(event));
        event = existsWatch.next();
        ctx.check("exists_watch_fires", Events.is(event, EventType.NodeCreated, dir + "/x"), Events.describe(event));

        Events deleteWatch = new Events();
        c.getData().usingWatcher(deleteWatch).forPath(dir + "/x");
        c.delete().forPath(dir + "/x");
        event = deleteWatch.next();
        ctx.check("delete_watch_fires", Events.is(event, EventType.NodeDeleted, dir + "/x"), Events.describe(event));

        // Persistent recursive watch (Curator 5's watchers().add()): every change below, in order.
        String tree = root + "/tree";
        c.create().forPath(tree);
        Events recursive = new Events();
        c.watchers().add().withMode(AddWatchMode.PERSISTENT_RECURSIVE).usingWatcher(recursive).forPath(tree);
        c.create().forPath(tree + "/k", bytes("1"));
        c.create().forPath(tree + "/k/deep", bytes("2"));
        c.setData().forPath(tree + "/k/deep", bytes("3"));
        c.delete().forPath(tree + "/k/deep");
        List<String> seen = new ArrayList<>();
        for (int i = 0; i < 4; i++) {
            seen.add(Events.describe(recursive.next()));
        }
        ctx.checkEquals("persistent_recursive_watch",
                List.of("NodeCreated " + tree + "/k", "NodeCreated " + tree + "/k/deep",
                        "NodeDataChanged " + tree + "/k/deep", "NodeDeleted " + tree + "/k/deep"),
                seen);

        // Background (asynchronous) call: the callback carries the data.
        BlockingQueue<String> background = new LinkedBlockingQueue<>();
        c.getData().inBackground((client, e) -> background.add(e.getType() + " " + e.getResultCode()
                + " " + str(e.getData()))).forPath(leaf);
        ctx.checkEquals("background_get_data", "GET_DATA 0 v3", poll(background));

        // Protected ephemeral-sequential create, as Curator's recipes use it.
        String protectedPath = c.create().creatingParentsIfNeeded().withProtection()
                .withMode(CreateMode.EPHEMERAL_SEQUENTIAL).forPath(root + "/prot/node-", bytes("p"));
        ctx.check("protected_ephemeral_sequential",
                protectedPath.matches(java.util.regex.Pattern.quote(root + "/prot/") + "_c_[0-9a-f-]{36}-node-\\d{10}"),
                "path " + protectedPath);
        Stat eph = c.checkExists().forPath(protectedPath);
        ctx.check("ephemeral_owner_is_session",
                eph != null && eph.getEphemeralOwner() == c.getZookeeperClient().getZooKeeper().getSessionId(),
                "stat " + eph);

        c.sync().forPath(leaf);
        ctx.check("sync", true, "");

        c.delete().deletingChildrenIfNeeded().forPath(root + "/parents");
        ctx.check("delete_deleting_children", c.checkExists().forPath(root + "/parents") == null,
                root + "/parents still exists");
    }

    // -------------------------------------------------------------- CuratorCache

    static void cache(Context ctx) throws Exception {
        CuratorFramework c = ctx.client();
        String root = ctx.base + "/cache";
        c.create().creatingParentsIfNeeded().forPath(root + "/pre", bytes("0"));

        BlockingQueue<String> events = new LinkedBlockingQueue<>();
        CuratorCacheListener listener = CuratorCacheListener.builder()
                .forCreates(node -> events.add("create " + node.getPath() + " " + str(node.getData())))
                .forChanges((old, node) -> events.add("change " + node.getPath() + " " + str(old.getData())
                        + "->" + str(node.getData())))
                .forDeletes(node -> events.add("delete " + node.getPath()))
                .forInitialized(() -> events.add("initialized"))
                .build();
        CuratorCache cache = ctx.closeLater(CuratorCache.build(c, root));
        cache.listenable().addListener(listener);
        cache.start();

        Set<String> initial = new TreeSet<>();
        String next;
        while ((next = poll(events)) != null && !next.equals("initialized")) {
            initial.add(next);
        }
        ctx.check("initialized", "initialized".equals(next), "no initialized event; saw " + initial);
        ctx.checkEquals("initial_load", new TreeSet<>(List.of("create " + root + " ", "create " + root + "/pre 0")),
                initial);

        c.create().forPath(root + "/a", bytes("1"));
        ctx.checkEquals("create_event", "create " + root + "/a 1", poll(events));
        c.setData().forPath(root + "/a", bytes("2"));
        ctx.checkEquals("change_event", "change " + root + "/a 1->2", poll(events));
        c.create().forPath(root + "/a/deep", bytes("d"));
        ctx.checkEquals("deep_create_event", "create " + root + "/a/deep d", poll(events));
        c.delete().forPath(root + "/a/deep");
        ctx.checkEquals("deep_delete_event", "delete " + root + "/a/deep", poll(events));
        c.delete().forPath(root + "/pre");
        ctx.checkEquals("delete_event", "delete " + root + "/pre", poll(events));

        ctx.checkEquals("cache_get", "2", cache.get(root + "/a").map(d -> str(d.getData())).orElse(null));
        ctx.checkEquals("cache_size", 2, cache.size());
        ctx.check("no_extra_events", events.poll(300, TimeUnit.MILLISECONDS) == null, "extra event " + events);
    }

    // ----------------------------------------------------------- InterProcessMutex

    static void mutex(Context ctx) throws Exception {
        CuratorFramework c1 = ctx.client();
        CuratorFramework c2 = ctx.client();
        String lockPath = ctx.base + "/lock";
        String counterPath = ctx.base + "/counter";
        c1.create().creatingParentsIfNeeded().forPath(counterPath, bytes("0"));

        InterProcessMutex first = new InterProcessMutex(c1, lockPath);
        InterProcessMutex second = new InterProcessMutex(c2, lockPath);
        ctx.check("acquire", first.acquire(WAIT_MS, TimeUnit.MILLISECONDS), "first client could not acquire");
        ctx.check("excludes_other_client", !second.acquire(300, TimeUnit.MILLISECONDS),
                "second client acquired a held lock");
        ctx.check("reentrant", first.acquire(WAIT_MS, TimeUnit.MILLISECONDS), "re-acquire by the holder failed");
        first.release();
        ctx.check("still_held_after_one_release", first.isAcquiredInThisProcess(), "lock lost after one release");
        first.release();
        ctx.check("other_client_acquires_after_release", second.acquire(WAIT_MS, TimeUnit.MILLISECONDS),
                "second client could not acquire a released lock");
        second.release();

        // Contention: 4 workers on 2 sessions; a read-modify-write of a znode without a
        // version is only correct if the lock really excludes.
        int workers = 4;
        int rounds = 10;
        AtomicInteger inside = new AtomicInteger();
        AtomicInteger overlaps = new AtomicInteger();
        AtomicInteger timeouts = new AtomicInteger();
        ExecutorService pool = Executors.newFixedThreadPool(workers);
        List<Future<?>> futures = new ArrayList<>();
        for (int w = 0; w < workers; w++) {
            CuratorFramework client = (w % 2 == 0) ? c1 : c2;
            futures.add(pool.submit(() -> {
                InterProcessMutex lock = new InterProcessMutex(client, lockPath);
                for (int i = 0; i < rounds; i++) {
                    if (!lock.acquire(WAIT_MS, TimeUnit.MILLISECONDS)) {
                        timeouts.incrementAndGet();
                        continue;
                    }
                    try {
                        if (inside.incrementAndGet() != 1) {
                            overlaps.incrementAndGet();
                        }
                        int value = Integer.parseInt(str(client.getData().forPath(counterPath)));
                        client.setData().forPath(counterPath, bytes(Integer.toString(value + 1)));
                        inside.decrementAndGet();
                    } finally {
                        lock.release();
                    }
                }
                return null;
            }));
        }
        for (Future<?> future : futures) {
            future.get(SCENARIO_MS, TimeUnit.MILLISECONDS);
        }
        pool.shutdown();
        ctx.checkEquals("contention_no_overlap", 0, overlaps.get());
        ctx.checkEquals("contention_no_timeouts", 0, timeouts.get());
        ctx.checkEquals("contention_counter", Integer.toString(workers * rounds), str(c1.getData().forPath(counterPath)));
        ctx.checkEquals("lock_nodes_cleaned_up", List.of(), c1.getChildren().forPath(lockPath));
    }

    // ---------------------------------------------------------------- LeaderLatch

    static void leader(Context ctx) throws Exception {
        CuratorFramework c1 = ctx.client();
        CuratorFramework c2 = ctx.client();
        String path = ctx.base + "/latch";
        BlockingQueue<String> leaders = new LinkedBlockingQueue<>();
        LeaderLatch one = ctx.closeLater(new LeaderLatch(c1, path, "one"));
        LeaderLatch two = ctx.closeLater(new LeaderLatch(c2, path, "two"));
        for (LeaderLatch latch : List.of(one, two)) {
            latch.addListener(new LeaderLatchListener() {
                @Override
                public void isLeader() {
                    leaders.add(latch.getId());
                }

                @Override
                public void notLeader() {
                }
            });
        }
        one.start();
        ctx.check("first_becomes_leader", one.await(WAIT_MS, TimeUnit.MILLISECONDS), "one never led");
        two.start();
        ctx.checkEquals("listener_told_leader", "one", poll(leaders));
        ctx.check("participants", eventually(() -> two.getParticipants().size() == 2),
                "participants " + two.getParticipants());
        ctx.check("only_one_leader", one.hasLeadership() && !two.hasLeadership(),
                "one=" + one.hasLeadership() + " two=" + two.hasLeadership());
        ctx.checkEquals("both_see_same_leader", "one", two.getLeader().getId());

        one.close();
        ctx.checkEquals("leadership_passes_on_close", "two", poll(leaders));
        ctx.check("second_has_leadership", two.hasLeadership(), "two does not report leadership");
        ctx.checkEquals("one_participant_left", 1, two.getParticipants().size());
    }

    // ------------------------------------------------------ DistributedAtomicLong

    static void atomic(Context ctx) throws Exception {
        CuratorFramework c1 = ctx.client();
        CuratorFramework c2 = ctx.client();
        String path = ctx.base + "/counter";
        DistributedAtomicLong counter = new DistributedAtomicLong(c1, path, new RetryNTimes(200, 5));
        ctx.check("initialize", counter.initialize(0L), "initialize on a fresh path returned false");
        ctx.check("initialize_only_once", !counter.initialize(7L), "initialize overwrote an existing value");

        int workers = 4;
        int rounds = 10;
        AtomicInteger failed = new AtomicInteger();
        ExecutorService pool = Executors.newFixedThreadPool(workers);
        List<Future<?>> futures = new ArrayList<>();
        for (int w = 0; w < workers; w++) {
            CuratorFramework client = (w % 2 == 0) ? c1 : c2;
            futures.add(pool.submit(() -> {
                DistributedAtomicLong mine = new DistributedAtomicLong(client, path, new RetryNTimes(200, 5));
                for (int i = 0; i < rounds; i++) {
                    if (!mine.increment().succeeded()) {
                        failed.incrementAndGet();
                    }
                }
                return null;
            }));
        }
        for (Future<?> future : futures) {
            future.get(SCENARIO_MS, TimeUnit.MILLISECONDS);
        }
        pool.shutdown();
        ctx.checkEquals("concurrent_increments_succeed", 0, failed.get());
        AtomicValue<Long> value = counter.get();
        ctx.check("get", value.succeeded(), "get did not succeed");
        ctx.checkEquals("concurrent_increments_total", (long) workers * rounds, value.postValue());

        AtomicValue<Long> swapped = counter.compareAndSet((long) workers * rounds, 100L);
        ctx.check("compare_and_set", swapped.succeeded() && swapped.postValue() == 100L,
                "succeeded=" + swapped.succeeded() + " post=" + swapped.postValue());
        AtomicValue<Long> stale = counter.compareAndSet((long) workers * rounds, 200L);
        ctx.check("compare_and_set_stale", !stale.succeeded(), "compareAndSet with a stale expectation succeeded");
        AtomicValue<Long> added = counter.add(5L);
        ctx.check("add", added.succeeded() && added.preValue() == 100L && added.postValue() == 105L,
                "pre=" + added.preValue() + " post=" + added.postValue());
        ctx.checkEquals("decrement", 104L, counter.decrement().postValue());
        ctx.checkEquals("value_is_8_bytes", 8, c2.getData().forPath(path).length);
    }

    // ---------------------------------------------------------- ServiceDiscovery

    /** A discovery payload, serialized by Jackson as Curator's JsonInstanceSerializer does. */
    public static final class Payload {
        public String zone;
        public int weight;

        public Payload() {
        }

        Payload(String zone, int weight) {
            this.zone = zone;
            this.weight = weight;
        }
    }

    static ServiceDiscovery<Payload> discovery(CuratorFramework client, String basePath) throws Exception {
        ServiceDiscovery<Payload> discovery = ServiceDiscoveryBuilder.builder(Payload.class)
                .client(client)
                .basePath(basePath)
                .serializer(new JsonInstanceSerializer<>(Payload.class))
                .build();
        discovery.start();
        return discovery;
    }

    static Set<String> ids(Collection<ServiceInstance<Payload>> instances) {
        Set<String> ids = new TreeSet<>();
        for (ServiceInstance<Payload> instance : instances) {
            ids.add(instance.getId());
        }
        return ids;
    }

    static void discovery(Context ctx) throws Exception {
        CuratorFramework registrar = ctx.client();
        CuratorFramework reader = ctx.client();
        String basePath = ctx.base + "/services";
        // Not closed through closeLater: closing it would unregister, and the point
        // below is that the session's end removes the instances by itself.
        ServiceDiscovery<Payload> publisher = discovery(registrar, basePath);
        ServiceDiscovery<Payload> consumer = ctx.closeLater(discovery(reader, basePath));

        ServiceInstance<Payload> web1 = ServiceInstance.<Payload>builder().name("web").id("web-1")
                .address("10.0.0.1").port(8080).payload(new Payload("zone-a", 1)).build();
        ServiceInstance<Payload> web2 = ServiceInstance.<Payload>builder().name("web").id("web-2")
                .address("10.0.0.2").port(8081).payload(new Payload("zone-b", 2)).build();
        ServiceInstance<Payload> db1 = ServiceInstance.<Payload>builder().name("db").id("db-1")
                .address("10.0.0.3").port(5432).payload(new Payload("zone-a", 1)).build();
        publisher.registerService(web1);
        publisher.registerService(web2);
        publisher.registerService(db1);

        ctx.checkEquals("query_for_names", new TreeSet<>(List.of("db", "web")),
                new TreeSet<>(consumer.queryForNames()));
        ctx.checkEquals("query_for_instances", new TreeSet<>(List.of("web-1", "web-2")),
                ids(consumer.queryForInstances("web")));
        ServiceInstance<Payload> found = consumer.queryForInstance("web", "web-2");
        ctx.check("query_for_instance",
                found != null && "10.0.0.2".equals(found.getAddress()) && found.getPort() == 8081
                        && "zone-b".equals(found.getPayload().zone) && found.getPayload().weight == 2,
                "found " + found);

        String json = str(reader.getData().forPath(basePath + "/web/web-1"));
        ctx.check("registration_is_curator_json",
                json.contains("\"name\":\"web\"") && json.contains("\"id\":\"web-1\"")
                        && json.contains("\"address\":\"10.0.0.1\"") && json.contains("\"port\":8080")
                        && json.contains("\"zone\":\"zone-a\""),
                "znode data " + json);
        Stat stat = reader.checkExists().forPath(basePath + "/web/web-1");
        ctx.check("registration_is_ephemeral", stat != null
                && stat.getEphemeralOwner() == registrar.getZookeeperClient().getZooKeeper().getSessionId(),
                "stat " + stat);

        ServiceProvider<Payload> provider = ctx.closeLater(
                consumer.serviceProviderBuilder().serviceName("web").build());
        provider.start();
        ServiceInstance<Payload> chosen = provider.getInstance();
        ctx.check("service_provider", chosen != null && Set.of("web-1", "web-2").contains(chosen.getId()),
                "provider chose " + chosen);

        ServiceCache<Payload> cache = ctx.closeLater(consumer.serviceCacheBuilder().name("web").build());
        BlockingQueue<String> changes = new LinkedBlockingQueue<>();
        cache.addListener(new ServiceCacheListener() {
            @Override
            public void cacheChanged() {
                changes.add("changed");
            }

            @Override
            public void stateChanged(CuratorFramework client, ConnectionState state) {
            }
        });
        cache.start();
        ctx.checkEquals("service_cache_instances", new TreeSet<>(List.of("web-1", "web-2")),
                ids(cache.getInstances()));

        publisher.updateService(ServiceInstance.<Payload>builder().name("web").id("web-1")
                .address("10.0.0.1").port(8080).payload(new Payload("zone-c", 5)).build());
        ctx.check("service_cache_sees_update", eventually(() -> cache.getInstances().stream()
                        .anyMatch(i -> i.getId().equals("web-1") && "zone-c".equals(i.getPayload().zone))),
                "cache never showed the updated payload");

        publisher.unregisterService(db1);
        ctx.checkEquals("unregister", Set.of(), ids(consumer.queryForInstances("db")));

        // The registrar's session ends (a crash, as far as the registry can tell):
        // its ephemeral instances go, and the watching cache learns of it.
        changes.clear();
        registrar.close();
        ctx.check("session_end_removes_instances", eventually(() -> cache.getInstances().isEmpty()),
                "cache still holds " + ids(cache.getInstances()));
        ctx.check("service_cache_listener_fired", !changes.isEmpty(), "cacheChanged never called");
        ctx.checkEquals("query_after_session_end", Set.of(), ids(consumer.queryForInstances("web")));
    }

    // -------------------------------------------------------------- transactions

    static void transaction(Context ctx) throws Exception {
        CuratorFramework c = ctx.client();
        String root = ctx.base + "/txn";
        c.create().creatingParentsIfNeeded().forPath(root + "/existing", bytes("e"));
        c.create().forPath(root + "/doomed");

        List<CuratorTransactionResult> results = c.transaction().forOperations(
                c.transactionOp().create().forPath(root + "/new", bytes("n")),
                c.transactionOp().create().withMode(CreateMode.PERSISTENT_SEQUENTIAL)
                        .forPath(root + "/seq-", bytes("s")),
                c.transactionOp().setData().forPath(root + "/existing", bytes("e2")),
                c.transactionOp().check().withVersion(1).forPath(root + "/existing"),
                c.transactionOp().delete().forPath(root + "/doomed"));
        List<String> types = new ArrayList<>();
        for (CuratorTransactionResult result : results) {
            types.add(result.getType() + " " + result.getForPath());
        }
        ctx.checkEquals("result_types",
                List.of("CREATE " + root + "/new", "CREATE " + root + "/seq-", "SET_DATA " + root + "/existing",
                        "CHECK " + root + "/existing", "DELETE " + root + "/doomed"),
                types);
        // Sequential suffixes come from the parent's cversion, which the earlier
        // creates in this very transaction already raised (2 children, then /new).
        ctx.checkEquals("sequential_result_path", root + "/seq-0000000003", results.get(1).getResultPath());
        Stat setStat = results.get(2).getResultStat();
        ctx.check("set_data_result_stat", setStat != null && setStat.getVersion() == 1, "stat " + setStat);
        ctx.checkEquals("committed_create", "n", str(c.getData().forPath(root + "/new")));
        ctx.checkEquals("committed_set", "e2", str(c.getData().forPath(root + "/existing")));
        ctx.check("committed_delete", c.checkExists().forPath(root + "/doomed") == null, "doomed still exists");

        try {
            c.transaction().forOperations(
                    c.transactionOp().create().forPath(root + "/never", bytes("x")),
                    c.transactionOp().check().withVersion(99).forPath(root + "/existing"),
                    c.transactionOp().delete().forPath(root + "/new"));
            ctx.check("failed_transaction_throws", false, "a transaction with a bad version committed");
        } catch (KeeperException.BadVersionException e) {
            ctx.check("failed_transaction_throws", true, "");
            List<Integer> codes = new ArrayList<>();
            for (OpResult result : e.getResults()) {
                codes.add(result instanceof OpResult.ErrorResult ? ((OpResult.ErrorResult) result).getErr() : null);
            }
            // ZooKeeper: ops before the failure report 0 (rolled back), the failing
            // one its error, the ones after it RUNTIMEINCONSISTENCY (-2).
            ctx.checkEquals("failed_transaction_results", List.of(0, -103, -2), codes);
        }
        ctx.check("failed_transaction_rolled_back", c.checkExists().forPath(root + "/never") == null
                && c.checkExists().forPath(root + "/new") != null, "a failed transaction left changes behind");
    }

    // ----------------------------------------------------------------------- main

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: CuratorCompat CONNECT_STRING BASE_PATH [SCENARIO...]");
            System.exit(2);
        }
        String connect = args[0];
        String base = args[1];
        List<String> names = args.length > 2 ? Arrays.asList(args).subList(2, args.length)
                : new ArrayList<>(SCENARIOS.keySet());
        int failures = 0;
        ExecutorService runner = Executors.newCachedThreadPool(r -> {
            Thread thread = new Thread(r, "scenario");
            thread.setDaemon(true);
            return thread;
        });
        for (String name : names) {
            Scenario scenario = SCENARIOS.get(name);
            if (scenario == null) {
                System.out.println("FAIL " + name + ": no such scenario; known: " + SCENARIOS.keySet());
                failures++;
                continue;
            }
            Context ctx = new Context(connect, base + "/" + name, name);
            Future<?> future = runner.submit(() -> {
                scenario.run(ctx);
                return null;
            });
            try {
                future.get(SCENARIO_MS, TimeUnit.MILLISECONDS);
            } catch (TimeoutException e) {
                ctx.failures++;
                System.out.println("FAIL " + name + ": did not finish within " + SCENARIO_MS + " ms");
                future.cancel(true);
            } catch (java.util.concurrent.ExecutionException e) {
                ctx.failures++;
                System.out.println("FAIL " + name + ": " + e.getCause());
                e.getCause().printStackTrace();
            } finally {
                ctx.closeAll();
            }
            System.out.flush();
            failures += ctx.failures;
        }
        System.out.println(failures == 0 ? "DONE all passed" : "DONE " + failures + " failed");
        System.out.flush();
        // Curator and ZooKeeper leave non-daemon threads behind after a failure.
        System.exit(failures == 0 ? 0 : 1);
    }
}
