// node-postgres scenarios of tests/test_drivers.py (pg, pg-cursor,
// pg-copy-streams). Prints a transcript that must be the same against a
// plain PostgreSQL 15 and through a cluster node.
//
//   node scenarios.js <host> <port> [<host2> <port2>]
//
// <host2>:<port2> is where a second session reads back what was committed
// (another cluster node; the same server when run against a plain one).
// Each scenario drops and creates its own node_* tables and leaves them
// behind for the test to compare across nodes. Each scenario has a time
// limit: past it, it prints TIMEOUT with the step it was in, its sockets are
// destroyed and the next scenario runs.
'use strict';

const crypto = require('crypto');
const { Readable } = require('stream');
const { pipeline } = require('stream/promises');
const pg = require('pg');
const Cursor = require('pg-cursor');
const copyStreams = require('pg-copy-streams');

const [host, portText, host2Arg, port2Text] = process.argv.slice(2);
const port = Number(portText);
const host2 = host2Arg || host;
const port2 = Number(port2Text || portText);
const SCENARIO_TIMEOUT_MS = 20000;
const NOTIFY_WAIT_MS = 5000;

let opened = [];          // clients of the running scenario, destroyed on a timeout
let currentStep = '';

function out(line) {
  process.stdout.write(line + '\n');
}

function describe(e) {
  if (e && e.code && /^[0-9A-Z]{5}$/.test(e.code)) {
    return `ERROR ${e.code} ${e.message.split('\n')[0]}`;
  }
  return `${(e && e.constructor && e.constructor.name) || 'Error'} ${String(e && e.message).split('\n')[0]}`;
}

async function step(what, fn) {
  currentStep = what;
  try {
    const r = await fn();
    out(`${what}: ${r === undefined ? 'ok' : r}`);
    return r;
  } catch (e) {
    out(`${what}: ${describe(e)}`);
    return undefined;
  }
}

async function connect(h = host, p = port) {
  const c = new pg.Client({ host: h, port: p, user: 'postgres', database: 'postgres' });
  c.on('error', () => {});      // a destroyed socket after a timeout
  opened.push(c);
  await c.connect();
  return c;
}

function show(rows) {
  return '[' + rows.map((r) => {
    const v = Object.values(r);
    const text = v.map((x) => (x === null ? 'NULL' : String(x)));
    return text.length === 1 ? text[0] : '(' + text.join(', ') + ')';
  }).join(', ') + ']';
}

async function seenElsewhere(sql) {
  await step('seen by another session', async () => {
    const c = await connect(host2, port2);
    try {
      return show((await c.query(sql)).rows);
    } finally {
      await c.end();
    }
  });
}

async function table(c, name, columns) {
  // one statement per query: DDL travels as the query string's text
  await c.query(`DROP TABLE IF EXISTS ${name}`);
  await c.query(`CREATE TABLE ${name} (${columns})`);
}

function withTimeout(promise, ms, what) {
  let timer;
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`TIMEOUT after ${ms} ms ${what}`)), ms);
  });
  return Promise.race([promise, limit]).finally(() => clearTimeout(timer));
}

// -- scenarios ---------------------------------------------------------------

async function simpleQueries() {
  const c = await connect();
  await step('select constants', async () => show((await c.query("SELECT 1 AS one, 'x'::text AS t, NULL AS n")).rows));
  await step('generate_series', async () => show((await c.query('SELECT g FROM generate_series(1, 5) g')).rows));
  await step('two statements', async () => {
    const rs = await c.query('SELECT 1 AS a; SELECT 2 AS b');
    return rs.map((r) => show(r.rows)).join(' ');
  });
  await step('syntax error', async () => (await c.query('SELEC 1')).rowCount);
  await step('after the error', async () => show((await c.query('SELECT 3 AS c')).rows));
  await c.end();
}

async function parameterized() {
  const c = await connect();
  await table(c, 'node_param', 'id int PRIMARY KEY, v text, n numeric');
  for (const id of [1, 2, 3]) {
    await step(`insert ${id}`, async () => (await c.query(
      'INSERT INTO node_param VALUES ($1, $2, $3)', [id, `v${id}`, id * 1.5])).rowCount);
  }
  await step('insert duplicate', async () => (await c.query(
    'INSERT INTO node_param VALUES ($1, $2, $3)', [2, 'dup', 0])).rowCount);
  await step('update', async () => (await c.query(
    'UPDATE node_param SET v = $1 WHERE id >= $2', ['big', 2])).rowCount);
  await step('select', async () => show((await c.query(
    'SELECT id, v, n FROM node_param WHERE id <> $1 ORDER BY id', [0])).rows));
  await step('null and text parameters', async () => show((await c.query(
    'SELECT $1::text IS NULL AS isnull, $2::int + 1 AS plus', [null, '41'])).rows));
  await seenElsewhere('SELECT id, v FROM node_param ORDER BY id');
  await c.end();
}

async function namedStatement() {
  const c = await connect();
  await table(c, 'node_named', 'id int PRIMARY KEY, v text');
  for (const id of [1, 2, 3]) {
    await step(`named insert ${id}`, async () => (await c.query(
      { name: 'node_ins', text: 'INSERT INTO node_named VALUES ($1, $2)', values: [id, `v${id}`] })).rowCount);
  }
  await step('named insert duplicate', async () => (await c.query(
    { name: 'node_ins', text: 'INSERT INTO node_named VALUES ($1, $2)', values: [1, 'dup'] })).rowCount);
  for (const id of [2, 9]) {
    await step(`named select ${id}`, async () => show((await c.query(
      { name: 'node_sel', text: 'SELECT v FROM node_named WHERE id = $1', values: [id] })).rows));
  }
  await c.query('BEGIN');
  await step('named insert 4 in a transaction', async () => (await c.query(
    { name: 'node_ins', text: 'INSERT INTO node_named VALUES ($1, $2)', values: [4, 'v4'] })).rowCount);
  await step('commit', async () => (await c.query('COMMIT')).command);
  await seenElsewhere('SELECT id, v FROM node_named ORDER BY id');
  await c.end();
}

async function transactions() {
  const c = await connect();
  await table(c, 'node_tx', 'id int PRIMARY KEY');
  await step('begin', async () => (await c.query('BEGIN')).command);
  await step('insert 1', async () => (await c.query('INSERT INTO node_tx VALUES ($1)', [1])).rowCount);
  await step('rollback', async () => (await c.query('ROLLBACK')).command);
  await seenElsewhere('SELECT id FROM node_tx ORDER BY id');
  await step('begin', async () => (await c.query('BEGIN')).command);
  await step('insert 2', async () => (await c.query('INSERT INTO node_tx VALUES ($1)', [2])).rowCount);
  await step('insert 3', async () => (await c.query('INSERT INTO node_tx VALUES (3)')).rowCount);
  await step('commit', async () => (await c.query('COMMIT')).command);
  await seenElsewhere('SELECT id FROM node_tx ORDER BY id');
  await step('begin', async () => (await c.query('BEGIN')).command);
  await step('insert 2 again', async () => (await c.query('INSERT INTO node_tx VALUES ($1)', [2])).rowCount);
  await step('insert 4', async () => (await c.query('INSERT INTO node_tx VALUES ($1)', [4])).rowCount);
  await step('commit of the failed transaction', async () => (await c.query('COMMIT')).command);
  await seenElsewhere('SELECT id FROM node_tx ORDER BY id');
  await c.end();
}

async function multiStatement() {
  const c = await connect();
  await table(c, 'node_multi', 'id int PRIMARY KEY');
  await step('BEGIN; INSERT; COMMIT in one query', async () => {
    const rs = await c.query('BEGIN; INSERT INTO node_multi VALUES (1); COMMIT');
    return rs.map((r) => r.command).join(' ');
  });
  await seenElsewhere('SELECT id FROM node_multi ORDER BY id');
  await step('BEGIN; INSERT; ROLLBACK in one query', async () => {
    const rs = await c.query('BEGIN; INSERT INTO node_multi VALUES (2); ROLLBACK');
    return rs.map((r) => r.command).join(' ');
  });
  await step('two INSERTs in one query', async () => {
    const rs = await c.query('INSERT INTO node_multi VALUES (3); INSERT INTO node_multi VALUES (4)');
    return rs.map((r) => `${r.command} ${r.rowCount}`).join(', ');
  });
  await step('INSERT; failing INSERT in one query', async () => {
    const rs = await c.query('INSERT INTO node_multi VALUES (5); INSERT INTO node_multi VALUES (3)');
    return rs.length;
  });
  await seenElsewhere('SELECT id FROM node_multi ORDER BY id');
  await c.end();
}

async function readCursor(c, sql, values, batch) {
  const cursor = c.query(new Cursor(sql, values));
  const sizes = [];
  const all = [];
  for (;;) {
    const rows = await cursor.read(batch);
    sizes.push(rows.length);
    all.push(...rows);
    if (rows.length === 0) break;
  }
  await cursor.close();
  return `reads of ${JSON.stringify(sizes)} rows: ${show(all)}`;
}

async function cursorInsertReturning() {
  const c = await connect();
  await table(c, 'node_cur', 'id int PRIMARY KEY, v text');
  await step('cursor over INSERT ... RETURNING, 2 rows a read', () => withTimeout(
    readCursor(c, "INSERT INTO node_cur SELECT g, 'v' || g FROM generate_series(1, 5) g RETURNING id, v",
      [], 2), 5000, 'reading the cursor'));
  await seenElsewhere('SELECT id, v FROM node_cur ORDER BY id');
  await c.end();
}

async function cursorSelect() {
  const c = await connect();
  await step('cursor over a SELECT, 3 rows a read', () => withTimeout(
    readCursor(c, 'SELECT g, g * 2 AS twice FROM generate_series(1, $1::int) g', [7], 3),
    5000, 'reading the cursor'));
  await step('cursor in a transaction', async () => {
    await c.query('BEGIN');
    const r = await withTimeout(readCursor(c, 'SELECT g FROM generate_series(1, 4) g', [], 3),
      5000, 'reading the cursor');
    await c.query('COMMIT');
    return r;
  });
  await c.end();
}

async function copyBothWays() {
  const c = await connect();
  await table(c, 'node_copy', 'id int PRIMARY KEY, v text');
  let text = '';
  for (let i = 1; i <= 300; i++) text += `${i},line ${i}\n`;
  await step('COPY FROM STDIN 300 rows', async () => {
    const stream = c.query(copyStreams.from('COPY node_copy FROM STDIN (FORMAT csv)'));
    await pipeline(Readable.from([text.slice(0, 1000), text.slice(1000)]), stream);
    return stream.rowCount;
  });
  await step('COPY FROM STDIN with a duplicate', async () => {
    const stream = c.query(copyStreams.from('COPY node_copy FROM STDIN (FORMAT csv)'));
    await pipeline(Readable.from(['301,x\n1,dup\n']), stream);
    return stream.rowCount;
  });
  await step('COPY FROM STDIN in a rolled back transaction', async () => {
    await c.query('BEGIN');
    const stream = c.query(copyStreams.from('COPY node_copy FROM STDIN (FORMAT csv)'));
    await pipeline(Readable.from(['401,x\n402,y\n']), stream);
    await c.query('ROLLBACK');
    return stream.rowCount;
  });
  await step('COPY TO STDOUT', async () => {
    const stream = c.query(copyStreams.to('COPY (SELECT * FROM node_copy ORDER BY id) TO STDOUT (FORMAT csv)'));
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    const got = Buffer.concat(chunks).toString();
    const md5 = crypto.createHash('md5').update(got).digest('hex');
    return `${got.split('\n').length - 1} lines, same as copied in: ${got === text}, md5 ${md5}`;
  });
  await step('select after COPY', async () => show((await c.query('SELECT count(*) FROM node_copy')).rows));
  await seenElsewhere('SELECT count(*), sum(id) FROM node_copy');
  await c.end();
}

async function listenNotify() {
  const listener = await connect();
  const w = await connect();
  await table(w, 'node_notify', 'id int PRIMARY KEY');
  const got = [];
  let waiter = null;
  listener.on('notification', (n) => {
    got.push(`${n.channel}:${n.payload}`);
    if (waiter) waiter();
  });
  const until = (payload) => new Promise((resolve) => {
    const done = () => {
      if (got.includes(`node_chan:${payload}`)) {
        clearTimeout(timer);
        waiter = null;
        resolve(JSON.stringify(got));
      }
    };
    const timer = setTimeout(() => {
      waiter = null;
      resolve(JSON.stringify(got) + ` (not within ${NOTIFY_WAIT_MS} ms)`);
    }, NOTIFY_WAIT_MS);
    waiter = done;
    done();
  });
  await step('listen', async () => (await listener.query('LISTEN node_chan')).command);
  await step('begin', async () => (await w.query('BEGIN')).command);
  await step('insert 1', async () => (await w.query('INSERT INTO node_notify VALUES (1)')).rowCount);
  await step('notify in the transaction', async () => (await w.query("NOTIFY node_chan, 'with-insert'")).command);
  await step('commit', async () => (await w.query('COMMIT')).command);
  await step('received', () => until('with-insert'));
  await step('begin', async () => (await w.query('BEGIN')).command);
  await step('insert 2', async () => (await w.query('INSERT INTO node_notify VALUES (2)')).rowCount);
  await step('notify in the transaction', async () => (await w.query("NOTIFY node_chan, 'rolled-back'")).command);
  await step('rollback', async () => (await w.query('ROLLBACK')).command);
  await step('pg_notify with a parameter in autocommit', async () =>
    (await w.query('SELECT pg_notify($1, $2)', ['node_chan', 'autocommit'])).rowCount);
  await step('received', () => until('autocommit'));
  await seenElsewhere('SELECT id FROM node_notify ORDER BY id');
  await listener.end();
  await w.end();
}

async function poolInserts() {
  const setup = await connect();
  await table(setup, 'node_pool', 'id int PRIMARY KEY, worker int');
  await setup.end();
  const pool = new pg.Pool({ host, port, user: 'postgres', database: 'postgres', max: 5 });
  pool.on('error', () => {});
  pool.on('connect', (client) => opened.push(client));
  await step('5 clients, 20 inserts each (every 4th in BEGIN/COMMIT)', async () => {
    const workers = [0, 1, 2, 3, 4].map(async (w) => {
      for (let i = 0; i < 20; i++) {
        const id = w * 100 + i;
        if (i % 4 === 0) {
          const client = await pool.connect();
          try {
            await client.query('BEGIN');
            await client.query('INSERT INTO node_pool VALUES ($1, $2)', [id, w]);
            await client.query('COMMIT');
          } finally {
            client.release();
          }
        } else {
          await pool.query('INSERT INTO node_pool VALUES ($1, $2)', [id, w]);
        }
      }
    });
    const results = await Promise.allSettled(workers);
    return results.map((r) => (r.status === 'fulfilled' ? 'done' : describe(r.reason))).join(', ');
  });
  await step('count', async () => show((await pool.query(
    'SELECT worker, count(*) FROM node_pool GROUP BY worker ORDER BY worker')).rows));
  await pool.end();
  await seenElsewhere('SELECT count(*), sum(id) FROM node_pool');
}

const SCENARIOS = [
  ['simple_queries', simpleQueries],
  ['parameterized', parameterized],
  ['named_statement', namedStatement],
  ['transactions', transactions],
  ['multi_statement_transaction', multiStatement],
  ['cursor_insert_returning', cursorInsertReturning],
  ['cursor_select', cursorSelect],
  ['copy_both_ways', copyBothWays],
  ['listen_notify', listenNotify],
  ['pool_inserts', poolInserts],
];

async function main() {
  const only = process.env.NODE_SCENARIO;     // run one scenario by hand
  for (const [name, fn] of SCENARIOS) {
    if (only && only !== name) continue;
    out(`== ${name}`);
    opened = [];
    currentStep = '(setup)';
    try {
      await withTimeout(fn(), SCENARIO_TIMEOUT_MS, 'in the scenario');
    } catch (e) {
      out(`scenario aborted in step "${currentStep}": ${describe(e)}`);
    }
    for (const c of opened) {
      // whatever a failed scenario left open; a stuck socket is dropped
      if (c.connection && c.connection.stream) c.connection.stream.destroy();
    }
  }
  out('== done');
  process.exit(0);
}

main();
