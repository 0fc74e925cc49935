'use strict';
/*
 * npm's node-zookeeper-client (pure JavaScript) against a ZooKeeper server.
 *
 * Usage: node compat.js CONNECT_STRING BASE_PATH [SCENARIO...]
 *
 * Runs each named scenario (all of them if none is named) under its own path
 * BASE_PATH/SCENARIO and prints one line per check, "OK scenario.check" or
 * "FAIL scenario.check: why", then exits 1 if any check failed. A scenario
 * that throws or overruns its deadline prints "FAIL scenario: why".
 * tests/test_compat_node.py knows which checks every scenario must print, and
 * runs this against real ZooKeeper 3.8 (the reference) and against zkgate.
 *
 * Every wait has a deadline. Absence of a watch event is proven by a round
 * trip, not by waiting: a ZooKeeper server sends a watch event before any
 * later reply on the same connection.
 */

const crypto = require('crypto');
const zookeeper = require('node-zookeeper-client');

const { ACL, CreateMode, Event, Exception, Id, Permission } = zookeeper;

/** How long any one expected event or reply may take. */
const WAIT_MS = 10000;
/** How long a whole scenario may take. */
const SCENARIO_MS = 45000;

const OP = { CREATE: 1, DELETE: 2, SET_DATA: 5, CHECK: 13, ERROR: -1 };

// ------------------------------------------------------------------- helpers

function withTimeout(promise, ms, what) {
    let timer;
    const deadline = new Promise((resolve, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: nothing within ${ms} ms`)), ms);
    });
    return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

/** Calls a callback-style client method; resolves with the callback's results after the error. */
function call(client, method, ...args) {
    return withTimeout(new Promise((resolve, reject) => {
        client[method](...args, (error, ...results) => (error ? reject(error) : resolve(results)));
    }), WAIT_MS, method);
}

/** The ZooKeeper error code a call failed with, or 'ok' if it did not fail. */
async function errorOf(promise) {
    try {
        await promise;
        return 'ok';
    } catch (error) {
        return typeof error.getCode === 'function' ? error.getCode() : String(error);
    }
}

function connect(connectString) {
    const client = zookeeper.createClient(connectString, {
        sessionTimeout: 4000,
        spinDelay: 100,
        retries: 2,
    });
    const connected = new Promise((resolve) => client.once('connected', () => resolve(client)));
    client.connect();
    return withTimeout(connected, WAIT_MS, `connect to ${connectString}`);
}

/** A watcher that queues the events it is given, as "TYPE_NAME path". */
function recorder() {
    const queued = [];
    const waiting = [];
    const fn = (event) => {
        const text = `${event.getName()} ${event.getPath()}`;
        const resolve = waiting.shift();
        if (resolve) {
            resolve(text);
        } else {
            queued.push(text);
        }
    };
    return {
        fn,
        next() {
            if (queued.length) {
                return Promise.resolve(queued.shift());
            }
            const waited = new Promise((resolve) => waiting.push(resolve));
            return withTimeout(waited, WAIT_MS, 'watch event').catch((error) => error.message);
        },
        pending() {
            return queued.slice();
        },
    };
}

function digest(userPassword) {
    const user = userPassword.split(':')[0];
    return `${user}:${crypto.createHash('sha1').update(userPassword).digest('base64')}`;
}

class Report {
    constructor(scenario) {
        this.scenario = scenario;
        this.failures = 0;
    }

    check(name, ok, why) {
        if (ok) {
            console.log(`OK ${this.scenario}.${name}`);
        } else {
            this.failures += 1;
            console.log(`FAIL ${this.scenario}.${name}: ${why}`);
        }
    }

    equal(name, expected, actual) {
        const e = JSON.stringify(expected);
        const a = JSON.stringify(actual);
        this.check(name, e === a, `expected ${e}, got ${a}`);
    }
}

// ----------------------------------------------------------------- scenarios

async function basic(ctx) {
    const c = await ctx.client();
    const root = ctx.base;
    await call(c, 'mkdirp', root);
    const p = `${root}/node`;

    const [created] = await call(c, 'create', p, Buffer.from('v1'));
    ctx.report.equal('create', p, created);
    ctx.report.equal('create_existing', Exception.NODE_EXISTS,
        await errorOf(call(c, 'create', p, Buffer.from('again'))));
    ctx.report.equal('create_without_parent', Exception.NO_NODE,
        await errorOf(call(c, 'create', `${root}/missing/child`, Buffer.from('x'))));

    const [data, stat] = await call(c, 'getData', p);
    ctx.report.equal('get_data', ['v1', 0, 2, 0], [data.toString(), stat.version, stat.dataLength,
        stat.numChildren]);

    const [present] = await call(c, 'exists', p);
    const [absent] = await call(c, 'exists', `${root}/missing`);
    ctx.report.check('exists', present !== null && absent === null,
        `exists gave ${JSON.stringify(present)} and ${JSON.stringify(absent)}`);

    const [setStat] = await call(c, 'setData', p, Buffer.from('v2'), 0);
    ctx.report.equal('set_data', 1, setStat.version);
    ctx.report.equal('set_data_bad_version', Exception.BAD_VERSION,
        await errorOf(call(c, 'setData', p, Buffer.from('v3'), 0)));

    const [seq1] = await call(c, 'create', `${p}/seq-`, Buffer.from('s'), CreateMode.PERSISTENT_SEQUENTIAL);
    const [seq2] = await call(c, 'create', `${p}/seq-`, Buffer.from('s'), CreateMode.PERSISTENT_SEQUENTIAL);
    ctx.report.equal('sequential', [`${p}/seq-0000000000`, `${p}/seq-0000000001`], [seq1, seq2]);
    const [children, parentStat] = await call(c, 'getChildren', p);
    ctx.report.equal('get_children', [['seq-0000000000', 'seq-0000000001'], 2, 2],
        [children.slice().sort(), parentStat.numChildren, parentStat.cversion]);

    ctx.report.equal('remove_not_empty', Exception.NOT_EMPTY, await errorOf(call(c, 'remove', p, -1)));
    ctx.report.equal('remove_bad_version', Exception.BAD_VERSION, await errorOf(call(c, 'remove', seq1, 3)));
    await call(c, 'remove', seq1, 0);
    await call(c, 'remove', seq2, -1);
    await call(c, 'remove', p, -1);
    const [gone] = await call(c, 'exists', p);
    ctx.report.check('remove', gone === null, 'node still exists after remove');
    ctx.report.equal('remove_missing', Exception.NO_NODE, await errorOf(call(c, 'remove', p, -1)));

    await call(c, 'mkdirp', `${root}/deep/er/still`, Buffer.from('leaf'));
    const [leaf] = await call(c, 'getData', `${root}/deep/er/still`);
    ctx.report.equal('mkdirp', 'leaf', leaf.toString());
    // A node created without data: ZooKeeper answers null data, not an empty buffer.
    await call(c, 'create', `${root}/nodata`);
    const [noData, noDataStat] = await call(c, 'getData', `${root}/nodata`);
    ctx.report.equal('create_without_data', [null, 0], [noData, noDataStat.dataLength]);
}

async function watches(ctx) {
    const c = await ctx.client();
    const root = ctx.base;
    await call(c, 'mkdirp', root);
    const p = `${root}/watched`;
    await call(c, 'create', p, Buffer.from('v1'));

    const data = recorder();
    await call(c, 'getData', p, data.fn);
    await call(c, 'setData', p, Buffer.from('v2'), -1);
    ctx.report.equal('data_watch', `NODE_DATA_CHANGED ${p}`, await data.next());
    await call(c, 'setData', p, Buffer.from('v3'), -1);
    await call(c, 'getData', p); // the round trip that proves no event was pending
    ctx.report.equal('data_watch_one_shot', [], data.pending());

    const children = recorder();
    const [before] = await call(c, 'getChildren', p, children.fn);
    ctx.report.equal('get_children_with_watcher', [], before);
    await call(c, 'create', `${p}/kid`, Buffer.from('k'));
    ctx.report.equal('child_watch', `NODE_CHILDREN_CHANGED ${p}`, await children.next());

    const created = recorder();
    const [missing] = await call(c, 'exists', `${p}/later`, created.fn);
    ctx.report.check('exists_watch_on_missing_node', missing === null, 'exists returned a stat');
    await call(c, 'create', `${p}/later`, Buffer.from('l'));
    ctx.report.equal('exists_watch_created', `NODE_CREATED ${p}/later`, await created.next());

    const changed = recorder();
    await call(c, 'exists', `${p}/later`, changed.fn);
    await call(c, 'setData', `${p}/later`, Buffer.from('m'), -1);
    ctx.report.equal('exists_watch_data_changed', `NODE_DATA_CHANGED ${p}/later`, await changed.next());

    const deleted = recorder();
    const parent = recorder();
    await call(c, 'getData', `${p}/kid`, deleted.fn);
    await call(c, 'getChildren', p, parent.fn);
    await call(c, 'remove', `${p}/kid`, -1);
    ctx.report.equal('delete_fires_data_and_child_watches',
        [`NODE_DELETED ${p}/kid`, `NODE_CHILDREN_CHANGED ${p}`], [await deleted.next(), await parent.next()]);

    // Another session's change reaches this one's watch.
    const other = await ctx.client();
    const remote = recorder();
    await call(c, 'getData', p, remote.fn);
    await call(other, 'setData', p, Buffer.from('from-other'), -1);
    ctx.report.equal('watch_sees_other_session', `NODE_DATA_CHANGED ${p}`, await remote.next());
}

async function transaction(ctx) {
    const c = await ctx.client();
    const root = ctx.base;
    await call(c, 'mkdirp', root);
    await call(c, 'create', `${root}/existing`, Buffer.from('e'));
    await call(c, 'create', `${root}/doomed`, Buffer.from('d'));

    const [results] = await call(c.transaction()
        .create(`${root}/new`, Buffer.from('n'))
        .create(`${root}/seq-`, Buffer.from('s'), CreateMode.PERSISTENT_SEQUENTIAL)
        .setData(`${root}/existing`, Buffer.from('e2'), 0)
        .check(`${root}/existing`, 1)
        .remove(`${root}/doomed`, -1), 'commit');
    ctx.report.equal('commit_result_types', [OP.CREATE, OP.CREATE, OP.SET_DATA, OP.CHECK, OP.DELETE],
        results.map((r) => r.type));
    ctx.report.equal('commit_result_paths', [`${root}/new`, `${root}/seq-0000000003`],
        [results[0].path, results[1].path]);
    ctx.report.equal('commit_set_data_stat', 1, results[2].stat && results[2].stat.version);
    const [newData] = await call(c, 'getData', `${root}/new`);
    const [existing] = await call(c, 'getData', `${root}/existing`);
    const [doomed] = await call(c, 'exists', `${root}/doomed`);
    ctx.report.equal('committed', ['n', 'e2', null], [newData.toString(), existing.toString(), doomed]);

    // The library hands over the failing op's error and every op's result together.
    const [failure, failedResults] = await withTimeout(new Promise((resolve) => {
        c.transaction()
            .create(`${root}/never`, Buffer.from('x'))
            .check(`${root}/existing`, 99)
            .remove(`${root}/new`, -1)
            .commit((error, res) => resolve([error ? error.getCode() : 'ok', res || []]));
    }), WAIT_MS, 'failed commit');
    ctx.report.equal('failed_commit_error', Exception.BAD_VERSION, failure);
    ctx.report.equal('failed_commit_results', [[OP.ERROR, 0], [OP.ERROR, -103], [OP.ERROR, -2]],
        failedResults.map((r) => [r.type, r.err]));
    const [never] = await call(c, 'exists', `${root}/never`);
    const [stillNew] = await call(c, 'exists', `${root}/new`);
    ctx.report.check('failed_commit_rolled_back', never === null && stillNew !== null,
        'a failed transaction left changes behind');
}

async function acl(ctx) {
    const owner = await ctx.client();
    const stranger = await ctx.client();
    const root = ctx.base;
    await call(owner, 'mkdirp', root);
    const p = `${root}/secret`;
    const userId = digest('user:pass');

    owner.addAuthInfo('digest', Buffer.from('user:pass'));
    const [created] = await call(owner, 'create', p, Buffer.from('s3cret'),
        [new ACL(Permission.ALL, new Id('digest', userId))]);
    ctx.report.equal('create_with_digest_acl', p, created);
    const [data] = await call(owner, 'getData', p);
    ctx.report.equal('owner_reads', 's3cret', data.toString());
    const [acls, aclStat] = await call(owner, 'getACL', p);
    ctx.report.equal('get_acl', [[Permission.ALL, 'digest', userId], 0],
        [acls.map((a) => [a.permission, a.id.scheme, a.id.id])[0], aclStat.aversion]);

    ctx.report.equal('stranger_get_data', Exception.NO_AUTH, await errorOf(call(stranger, 'getData', p)));
    ctx.report.equal('stranger_set_data', Exception.NO_AUTH,
        await errorOf(call(stranger, 'setData', p, Buffer.from('x'), -1)));
    ctx.report.equal('stranger_get_acl', Exception.NO_AUTH, await errorOf(call(stranger, 'getACL', p)));
    stranger.addAuthInfo('digest', Buffer.from('user:wrong'));
    ctx.report.equal('wrong_password', Exception.NO_AUTH, await errorOf(call(stranger, 'getData', p)));
    stranger.addAuthInfo('digest', Buffer.from('user:pass'));
    ctx.report.equal('add_auth_info', 'ok', await errorOf(call(stranger, 'getData', p)));

    ctx.report.equal('set_acl_bad_version', Exception.BAD_VERSION,
        await errorOf(call(owner, 'setACL', p, ACL.OPEN_ACL_UNSAFE, 3)));
    await call(owner, 'setACL', p, [new ACL(Permission.READ, Id.ANYONE_ID_UNSAFE)], 0);
    const [, after] = await call(owner, 'getACL', p);
    ctx.report.equal('set_acl', 1, after.aversion);
    ctx.report.equal('world_read_only', ['ok', Exception.NO_AUTH],
        [await errorOf(call(owner, 'getData', p)), await errorOf(call(owner, 'setData', p, Buffer.from('y'), -1))]);
    ctx.report.equal('set_acl_needs_admin', Exception.NO_AUTH,
        await errorOf(call(owner, 'setACL', p, ACL.OPEN_ACL_UNSAFE, -1)));
    ctx.report.equal('invalid_acl', Exception.INVALID_ACL, await errorOf(call(owner, 'create', `${root}/bad`,
        Buffer.from('b'), [new ACL(Permission.ALL, new Id('digest', 'no-hash-here'))])));

    // An auth scheme the server does not know ends the session.
    const doomed = await ctx.client();
    const failed = new Promise((resolve) => doomed.once('authenticationFailed', () => resolve('auth failed')));
    doomed.addAuthInfo('no-such-scheme', Buffer.from('whatever'));
    ctx.report.equal('unknown_auth_scheme_fails', 'auth failed',
        await withTimeout(failed, WAIT_MS, 'authenticationFailed').catch((error) => error.message));
}

async function ephemeral(ctx) {
    const watcher = await ctx.client();
    const owner = await ctx.client();
    const root = ctx.base;
    await call(watcher, 'mkdirp', root);

    const [e] = await call(owner, 'create', `${root}/e`, Buffer.from('mine'), CreateMode.EPHEMERAL);
    const [es] = await call(owner, 'create', `${root}/es-`, Buffer.from('seq'), CreateMode.EPHEMERAL_SEQUENTIAL);
    ctx.report.equal('ephemeral_sequential_name', `${root}/es-0000000001`, es);
    const [stat] = await call(watcher, 'exists', e);
    ctx.report.check('ephemeral_owner', stat !== null && stat.ephemeralOwner.equals(owner.getSessionId()),
        `ephemeralOwner ${stat && stat.ephemeralOwner.toString('hex')}, session ${owner.getSessionId().toString('hex')}`);
    ctx.report.equal('no_children_for_ephemerals', Exception.NO_CHILDREN_FOR_EPHEMERALS,
        await errorOf(call(owner, 'create', `${e}/child`, Buffer.from('c'))));

    const deleted = recorder();
    const children = recorder();
    await call(watcher, 'exists', e, deleted.fn);
    const [before] = await call(watcher, 'getChildren', root, children.fn);
    ctx.report.equal('children_before_close', ['e', 'es-0000000001'], before.slice().sort());

    owner.close();
    ctx.report.equal('close_fires_delete_watch', `NODE_DELETED ${e}`, await deleted.next());
    ctx.report.equal('close_fires_child_watch', `NODE_CHILDREN_CHANGED ${root}`, await children.next());
    const [after] = await call(watcher, 'getChildren', root);
    ctx.report.equal('ephemerals_removed_on_close', [], after);
}

const SCENARIOS = { basic, watches, transaction, acl, ephemeral };

// ---------------------------------------------------------------------- main

async function runScenario(connectString, base, name) {
    const report = new Report(name);
    const clients = [];
    const ctx = {
        base: `${base}/${name}`,
        report,
        async client() {
            const client = await connect(connectString);
            clients.push(client);
            return client;
        },
    };
    try {
        const scenario = SCENARIOS[name];
        if (!scenario) {
            throw new Error(`no such scenario; known: ${Object.keys(SCENARIOS).join(', ')}`);
        }
        await withTimeout(scenario(ctx), SCENARIO_MS, `scenario ${name}`);
    } catch (error) {
        report.failures += 1;
        console.log(`FAIL ${name}: ${error && error.stack ? error.stack.split('\n').join(' | ') : error}`);
    } finally {
        clients.forEach((client) => client.close());
    }
    return report.failures;
}

async function main() {
    const [connectString, base, ...names] = process.argv.slice(2);
    if (!connectString || !base) {
        console.error('usage: node compat.js CONNECT_STRING BASE_PATH [SCENARIO...]');
        process.exit(2);
    }
    let failures = 0;
    for (const name of names.length ? names : Object.keys(SCENARIOS)) {
        failures += await runScenario(connectString, base, name);
    }
    console.log(failures === 0 ? 'DONE all passed' : `DONE ${failures} failed`);
    process.exit(failures === 0 ? 0 : 1);
}

main();
