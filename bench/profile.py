#!/usr/bin/env python3
"""Groups `perf script -F ip,sym` samples (taken with -g) into cost areas: kernel time by the
system-call path it serves, user time by the leaf function's crate or role. Prints a markdown
table. Usage: perf script -i perf.data -F ip,sym | python3 bench/profile.py"""
import collections
import sys

# Kernel samples: the first matching frame anywhere in the call chain names the path.
KERNEL_PATHS = [
    ("udp_sendmsg", "kernel: UDP send (QUIC packets out)"),
    ("udp_recvmsg", "kernel: UDP receive (QUIC packets in)"),
    ("tcp_sendmsg", "kernel: TCP send (HTTP/2 upstream)"),
    ("tcp_recvmsg", "kernel: TCP receive (HTTP/2 upstream)"),
    ("net_rx_action", "kernel: loopback softirq (packet delivery)"),
    ("io_uring", "kernel: io_uring submission/completion"),
    ("schedule", "kernel: scheduler / wake-ups"),
    ("epoll", "kernel: epoll"),
]
# User samples, by the leaf symbol.
USER_AREAS = [
    (("aes_", "gcm_", "chacha", "EVP_", "boring", "ssl_", "SSL_", "bssl", "x25519", "sha256", "poly1305", "CRYPTO_"), "crypto (BoringSSL: packet protection)"),
    (("quiche::h3::qpack", "octets::Octets::get_huffman", "huffman"), "QPACK (HTTP/3 header coding)"),
    (("quiche::h3",), "quiche HTTP/3 framing"),
    (("quiche::",), "quiche QUIC transport (streams, frames, recovery, ACKs)"),
    (("hpack", "h2::"), "h2 (HTTP/2 upstream, HPACK)"),
    (("mi_", "_mi_", "malloc", "free", "realloc"), "allocator (mimalloc)"),
    (("memmove", "memcpy", "memset", "memcmp"), "memcpy/memset"),
    (("monoio::", "futures", "tokio"), "monoio runtime / futures"),
    (("spooky::",), "Spooky's own code (edge, bridge, transport)"),
    (("clock_gettime", "vdso"), "clock_gettime"),
]

def classify(frames):
    leaf = frames[0]
    if leaf[0] == "k":
        chain = " ".join(f[1] for f in frames if f[0] == "k")
        for key, name in KERNEL_PATHS:
            if key in chain:
                return name
        return "kernel: other (syscall entry/exit, faults, IRQ)"
    for keys, name in USER_AREAS:
        if any(k in leaf[1] for k in keys):
            return name
    return "other user space"

def samples(lines):
    frames = []
    for line in lines:
        line = line.strip()
        if not line:
            if frames:
                yield frames
            frames = []
            continue
        parts = line.split(None, 1)
        ip, sym = parts[0], parts[1] if len(parts) > 1 else "[unknown]"
        kernel = ip.startswith("ffff")
        frames.append(("k" if kernel else "u", sym))
    if frames:
        yield frames

counts = collections.Counter(classify(f) for f in samples(sys.stdin))
total = sum(counts.values())
print(f"| area | share of proxy CPU samples |\n|---|---|")
for name, n in counts.most_common():
    print(f"| {name} | {100 * n / total:.1f}% |")
print(f"\n{total} samples")
