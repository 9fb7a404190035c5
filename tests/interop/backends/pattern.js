// spooky-backend's deterministic byte pattern (src/tools/pattern.rs): xorshift64 from
// 0x9E3779B97F4A7C15, byte (state >> 24) & 0xff, repeating every 65,521 bytes (a prime).
'use strict';

const PERIOD = 65521;
const MASK = (1n << 64n) - 1n;

const table = (() => {
  const one = Buffer.alloc(PERIOD);
  let s = 0x9E3779B97F4A7C15n;
  for (let i = 0; i < PERIOD; i++) {
    s ^= (s << 13n) & MASK;
    s ^= s >> 7n;
    s ^= (s << 17n) & MASK;
    one[i] = Number((s >> 24n) & 0xffn);
  }
  return one;
})();

// `len` pattern bytes starting at stream offset `offset`.
function pattern(offset, len) {
  const out = Buffer.allocUnsafe(len);
  let pos = offset % PERIOD;
  let done = 0;
  while (done < len) {
    const n = Math.min(len - done, PERIOD - pos);
    table.copy(out, done, pos, pos + n);
    done += n;
    pos = 0;
  }
  return out;
}

module.exports = { pattern, PERIOD };
