// An h2c backend on Node's built-in `http2` that misbehaves in one chosen, RFC-legal way, for
// tests/interop/test_upstream_replay.py. Endpoints as in h2_server.js:
//   GET  /bytes/N       N bytes of spooky-backend's pattern
//   POST /echo?id=X     the body back, with x-body-sha256 and x-body-length of what arrived
// and on a separate HTTP/1.1 port, for the test (never through Spooky):
//   GET  /stats         JSON: every request body this server saw, with its id, stream, bytes
//                       received, sha256, whether it ended (END_STREAM, not a reset), what was
//                       done with it and the stream's RST_STREAM code if any; counts of
//                       refusals, GOAWAYs and connections
//
// Modes (--mode):
//   refuse-first-post   the first attempt of each POST id (without an id: the first POST of each
//                       connection) is answered RST_STREAM(REFUSED_STREAM) before any of its body
//                       is read; later attempts are echoed
//   goaway-mid-upload   on the first attempt of each POST id, once --after bytes of its body
//                       arrived: GOAWAY(NO_ERROR, last_stream_id = that stream's id - 2) and the
//                       body is no longer read, so the stream is unprocessed (RFC 9113 §6.8);
//                       --window sets a larger initial stream and connection window, so more
//                       than the default 64 KiB can arrive before that. Node's session.goaway()
//                       turns a last_stream_id of 0 into the newest stream's id, so an upload on
//                       stream 1 cannot be declared unprocessed: it is echoed and counted in
//                       `not_victimised` (tests send a GET first on a fresh connection)
//   goaway-after        every connection: when its --streams'th stream arrives, GOAWAY(NO_ERROR,
//                       last_stream_id = that stream); it and the ones before are answered,
//                       streams above it are ignored (never answered, never read), and the
//                       connection is closed once the answered ones are done, as nginx does at
//                       keepalive_requests
//   none                well-behaved
//
// Usage: node h2_faults.js --mode M [--after BYTES] [--window BYTES] [--streams N]
// Prints "listening on 127.0.0.1:PORT stats=PORT" once both ports accept connections.
'use strict';

const http = require('node:http');
const http2 = require('node:http2');
const crypto = require('node:crypto');
const { pattern } = require('./pattern.js');

const { NGHTTP2_REFUSED_STREAM, NGHTTP2_NO_ERROR } = http2.constants;

function arg(name, dflt) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const mode = arg('mode', 'none');
const after = Number(arg('after', 16384));
const windowSize = arg('window') ? Number(arg('window')) : undefined;
const goawayStreams = Number(arg('streams', 100));
if (!['refuse-first-post', 'goaway-mid-upload', 'goaway-after', 'none'].includes(mode)) {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}

const stats = { mode, bodies: [], refused: 0, goaways: 0, connections: 0, ignored_streams: 0, answered: 0, not_victimised: 0 };
const seenIds = new Set();
let sessionSeq = 0;

function echo(stream, rec) {
  const parts = [];
  const h = crypto.createHash('sha256');
  stream.on('data', (chunk) => { parts.push(chunk); h.update(chunk); rec.received += chunk.length; });
  stream.on('end', () => {
    // A reset (by the client, or by nghttp2 for a body shorter than its content-length) also
    // ends the readable side: only an END_STREAM on a live stream completes the body.
    if (stream.aborted || stream.destroyed || stream.closed) return;
    rec.ended = true;
    rec.sha256 = h.digest('hex');
    rec.outcome = 'echoed';
    stream.respond({
      ':status': 200,
      'content-type': 'application/octet-stream',
      'content-length': rec.received,
      'x-body-sha256': rec.sha256,
      'x-body-length': rec.received,
    });
    stream.end(Buffer.concat(parts, rec.received));
    stats.answered += 1;
  });
}

const settings = windowSize ? { initialWindowSize: windowSize } : {};
const server = http2.createServer({ settings });

server.on('session', (session) => {
  stats.connections += 1;
  session.seq = ++sessionSeq;
  session.streamCount = 0;
  session.firstPostSeen = false;
  session.lastStreamId = null; // set once this server sent GOAWAY
  session.active = new Set(); // processed streams (at or below lastStreamId) not closed yet
  if (windowSize) session.setLocalWindowSize(windowSize);
  session.on('error', () => {});
});

function goaway(session, lastStreamId) {
  session.lastStreamId = lastStreamId;
  stats.goaways += 1;
  session.goaway(NGHTTP2_NO_ERROR, lastStreamId);
  // Whatever the client does, a connection this server sent GOAWAY on is gone in 10 s.
  setTimeout(() => session.destroy(), 10000).unref();
}

// goaway-after: once every processed stream is done, close the connection (nginx does the
// same); the ignored streams above last_stream_id die with it. The short delay lets the last
// frames leave before the socket closes.
function closeWhenDone(session) {
  if (mode === 'goaway-after' && session.lastStreamId !== null && session.active.size === 0) {
    setTimeout(() => session.destroy(), 100).unref();
  }
}

server.on('stream', (stream, headers) => {
  const session = stream.session;
  session.streamCount += 1;
  stream.on('error', () => {});
  if (session.lastStreamId !== null && stream.id > session.lastStreamId) {
    stats.ignored_streams += 1; // above our GOAWAY's last_stream_id: not processed
    return;
  }
  session.active.add(stream.id);
  stream.on('close', () => {
    session.active.delete(stream.id);
    closeWhenDone(session);
  });
  if (mode === 'goaway-after' && session.streamCount === goawayStreams) {
    goaway(session, stream.id);
  }
  const method = headers[':method'];
  const url = new URL(headers[':path'], 'http://x');
  const m = /^\/bytes\/(\d+)$/.exec(url.pathname);
  if (method === 'GET' && m) {
    const n = Number(m[1]);
    stream.respond({ ':status': 200, 'content-type': 'application/octet-stream', 'content-length': n });
    stream.end(pattern(0, n));
    stats.answered += 1;
    return;
  }
  if (method !== 'POST' || url.pathname !== '/echo') {
    stream.respond({ ':status': 404 });
    stream.end('not found\n');
    return;
  }
  const id = url.searchParams.get('id');
  let first = id !== null ? !seenIds.has(id) : !session.firstPostSeen;
  if (mode === 'goaway-mid-upload' && first && stream.id === 1) {
    stats.not_victimised += 1;
    first = false;
  }
  if (id !== null) seenIds.add(id);
  session.firstPostSeen = true;
  const rec = {
    id, connection: session.seq, stream: stream.id, content_length: headers['content-length'] ?? null,
    received: 0, ended: false, sha256: null, outcome: 'open',
  };
  stats.bodies.push(rec);
  stream.on('close', () => {
    rec.rst_code = stream.rstCode ?? null;
    if (!rec.ended && rec.outcome === 'open') rec.outcome = 'aborted';
  });
  if (mode === 'refuse-first-post' && first) {
    rec.outcome = 'refused';
    stats.refused += 1;
    stream.close(NGHTTP2_REFUSED_STREAM);
    return;
  }
  if (mode === 'goaway-mid-upload' && first) {
    const h = crypto.createHash('sha256');
    stream.on('data', (chunk) => {
      rec.received += chunk.length;
      h.update(chunk);
      if (rec.received >= after && rec.outcome === 'open') {
        rec.outcome = 'goaway';
        stream.pause(); // no more reading: the rest of its window fills, then nothing moves
        goaway(session, Math.max(0, stream.id - 2));
      }
    });
    stream.on('end', () => {
      if (stream.aborted || stream.destroyed || stream.closed) return;
      rec.ended = true;
      rec.sha256 = h.digest('hex');
    });
    return;
  }
  echo(stream, rec);
});

const statsServer = http.createServer((req, res) => {
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify(stats));
});

server.listen(0, '127.0.0.1', () => {
  statsServer.listen(0, '127.0.0.1', () => {
    console.log(`listening on 127.0.0.1:${server.address().port} stats=${statsServer.address().port}`);
  });
});
process.on('SIGTERM', () => process.exit(0));
