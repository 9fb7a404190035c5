// An h2c backend on Node's built-in `http2` module at its default settings, for the interop
// suite (tests/interop/test_real_backends.py).
//
//   GET  /bytes/N  N bytes of spooky-backend's deterministic pattern (xorshift64, period
//                  65,521: the same bytes as src/tools/pattern.rs)
//   POST /echo     the request body back, with x-body-sha256 and x-body-length of what was
//                  received (read to its end first: the hash must precede the body)
//   GET  /stats    JSON: requests, POST bodies and bytes received, connections (sessions) accepted
//
// Usage: node h2_server.js [PORT]   (0 or none: any free port). Prints
// "listening on 127.0.0.1:PORT" once it accepts connections.
'use strict';

const http2 = require('node:http2');
const crypto = require('node:crypto');
const { pattern } = require('./pattern.js');

const stats = { requests: 0, posts: 0, post_bytes: 0, connections: 0 };

const server = http2.createServer();
server.on('session', () => { stats.connections += 1; });
server.on('stream', (stream, headers) => {
  stats.requests += 1;
  const method = headers[':method'];
  const path = headers[':path'];
  const m = /^\/bytes\/(\d+)$/.exec(path);
  if (method === 'GET' && m) {
    const n = Number(m[1]);
    stream.respond({ ':status': 200, 'content-type': 'application/octet-stream', 'content-length': n });
    stream.end(pattern(0, n));
  } else if (method === 'POST' && path === '/echo') {
    const parts = [];
    const h = crypto.createHash('sha256');
    let total = 0;
    stream.on('data', (chunk) => { parts.push(chunk); h.update(chunk); total += chunk.length; });
    stream.on('end', () => {
      if (stream.aborted || stream.destroyed || stream.closed) return; // a reset, not END_STREAM
      stats.posts += 1;
      stats.post_bytes += total;
      stream.respond({
        ':status': 200,
        'content-type': 'application/octet-stream',
        'content-length': total,
        'x-body-sha256': h.digest('hex'),
        'x-body-length': total,
      });
      stream.end(Buffer.concat(parts, total));
    });
  } else if (method === 'GET' && path === '/stats') {
    stream.respond({ ':status': 200, 'content-type': 'application/json' });
    stream.end(JSON.stringify(stats));
  } else {
    stream.respond({ ':status': 404, 'content-type': 'text/plain' });
    stream.end('not found\n');
  }
  stream.on('error', () => {});
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening on 127.0.0.1:${server.address().port}`);
});
process.on('SIGTERM', () => process.exit(0));
