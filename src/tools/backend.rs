//! The HTTP/2 test backend (`spooky-backend`): h2c with prior knowledge, one monoio runtime per
//! thread on a shared `SO_REUSEPORT` port.
//!
//! | path | response |
//! |---|---|
//! | `/bytes/N` | N bytes of [`super::pattern`], `content-length: N` |
//! | `/echo` | the request body streamed back as it arrives; request trailers echoed as trailers |
//! | `/sink` | reads the body, answers `{"bytes":N,"sha256":"…"}` |
//! | `/headers` | the request head as text: `:method`, `:scheme`, `:authority`, `:path`, fields |
//! | `/status/CODE` | that status with a short body |
//! | `/trailers` | body `ok` with trailers `grpc-status: 0`, `x-trailer: yes` |
//! | `/reset-after/N` | N pattern bytes, then `RST_STREAM(INTERNAL_ERROR)` |
//! | `/count/KEY` | counts a request under KEY (any method; the body is read), answers the count |
//! | `/peek/KEY` | the count under KEY, without counting |
//! | `/goaway` | `200`, then a graceful HTTP/2 shutdown (GOAWAY) of that connection |
//! | anything else | `200`, body `hello from <name>` |
//!
//! Query parameters on any path: `delay_ms=N` waits before the response head, `status=N`
//! overrides the status. Every response carries `x-backend: <name>`.

use super::pattern;
use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use monoio::io::IntoPollIo;
use sha2::{Digest, Sha256};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

/// Backend options.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    pub threads: usize,
    /// Reported in `x-backend` and the default body, to tell backends apart.
    pub name: String,
    /// Answer every request with this status (simulates a failing backend).
    pub fail_status: Option<u16>,
    /// Wait this long before every response head (simulates a slow backend).
    pub delay: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS advertised to clients.
    pub max_streams: u32,
    /// Serve HTTP/2 over TLS (ALPN h2) with this PEM certificate chain and key.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// A TLS acceptor that only speaks h2.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<boring::ssl::SslAcceptor> {
    use boring::ssl::{select_next_proto, AlpnError, SslAcceptor, SslFiletype, SslMethod};
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
    b.set_certificate_chain_file(cert)?;
    b.set_private_key_file(key, SslFiletype::PEM)?;
    b.set_alpn_select_callback(|_, client| select_next_proto(b"\x02h2", client).ok_or(AlpnError::NOACK));
    Ok(b.build())
}

/// Request counts by key, for `/count/` and `/peek/` (tests check what reached a backend).
static COUNTS: std::sync::Mutex<Option<std::collections::HashMap<String, u64>>> = std::sync::Mutex::new(None);

fn count(key: &str, add: u64) -> u64 {
    let mut guard = COUNTS.lock().expect("not poisoned");
    let n = guard.get_or_insert_with(Default::default).entry(key.to_string()).or_insert(0);
    *n += add;
    *n
}

/// Serves forever on `opts.listen`. Returns only on a start-up error.
pub fn serve(opts: Options) -> anyhow::Result<()> {
    let mut listeners = Vec::new();
    let mut addr = opts.listen;
    for _ in 0..opts.threads.max(1) {
        let l = bind_tcp(addr)?;
        addr = l.local_addr()?;
        listeners.push(l);
    }
    let acceptor = match &opts.tls {
        Some((cert, key)) => Some(std::sync::Arc::new(tls_acceptor(cert, key)?)),
        None => None,
    };
    let mode = if acceptor.is_some() { "h2 over TLS" } else { "h2c" };
    eprintln!("spooky-backend {} listening on {addr} ({mode})", opts.name);
    let name = opts.name;
    let behaviour = Behaviour { fail_status: opts.fail_status, delay: opts.delay, max_streams: opts.max_streams };
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let name = name.clone();
            let acceptor = acceptor.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build()?;
                rt.block_on(accept_loop(l, Rc::from(name.as_str()), behaviour, acceptor))
            })
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("backend thread panicked"))??;
    }
    Ok(())
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Backend-wide behaviour for tests (see [`Options`]).
#[derive(Clone, Copy)]
struct Behaviour {
    fail_status: Option<u16>,
    delay: Duration,
    max_streams: u32,
}

async fn accept_loop(
    l: std::net::TcpListener,
    name: Rc<str>,
    behaviour: Behaviour,
    tls: Option<std::sync::Arc<boring::ssl::SslAcceptor>>,
) -> anyhow::Result<()> {
    let listener = monoio::net::TcpListener::from_std(l)?;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("spooky-backend: accept: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(io) = tcp.into_poll_io() else { continue };
        let (name, tls) = (name.clone(), tls.clone());
        monoio::spawn(async move {
            match tls {
                None => serve_connection(io, name, behaviour).await,
                Some(acceptor) => {
                    if let Ok(io) = tokio_boring::accept(&acceptor, io).await {
                        serve_connection(io, name, behaviour).await;
                    }
                }
            }
        });
    }
}

/// Set by `/goaway` to make its connection start a graceful shutdown.
#[derive(Default)]
struct Goaway {
    requested: std::cell::Cell<bool>,
    waker: std::cell::RefCell<Option<std::task::Waker>>,
}

async fn serve_connection<IO>(io: IO, name: Rc<str>, behaviour: Behaviour)
where
    IO: monoio::io::poll_io::AsyncRead + monoio::io::poll_io::AsyncWrite + Unpin,
{
    let conn = h2::server::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(64 << 10)
        .max_concurrent_streams(behaviour.max_streams)
        .handshake::<_, Bytes>(io)
        .await;
    let Ok(mut conn) = conn else { return };
    let goaway = Rc::new(Goaway::default());
    let mut shutting_down = false;
    loop {
        let next = poll_fn(|cx| {
            if goaway.requested.get() && !shutting_down {
                // GOAWAY; streams already accepted still finish.
                conn.graceful_shutdown();
                shutting_down = true;
            }
            *goaway.waker.borrow_mut() = Some(cx.waker().clone());
            conn.poll_accept(cx)
        })
        .await;
        let Some(Ok((req, respond))) = next else { return };
        monoio::spawn(handle(req, respond, name.clone(), behaviour, goaway.clone()));
    }
}

async fn handle(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    name: Rc<str>,
    behaviour: Behaviour,
    goaway: Rc<Goaway>,
) {
    let query = Query::parse(req.uri().query().unwrap_or(""));
    let delay = Duration::from_millis(query.delay_ms) + behaviour.delay;
    if !delay.is_zero() {
        monoio::time::sleep(delay).await;
    }
    let path = req.uri().path().to_string();
    let respond = &mut respond;
    let status = |default: u16| StatusCode::from_u16(query.status.unwrap_or(default)).unwrap_or(StatusCode::OK);
    let head = |status: StatusCode, len: Option<u64>| {
        let mut r = Response::builder().status(status).header("x-backend", &*name);
        if let Some(len) = len {
            r = r.header(http::header::CONTENT_LENGTH, len);
        }
        r.body(()).expect("valid response head")
    };
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(2, '/').collect();
    if let Some(code) = behaviour.fail_status.filter(|_| parts[0] != "peek") {
        if parts[0] == "count" {
            count(parts.get(1).copied().unwrap_or(""), 1);
        }
        let code = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let text = format!("forced failure {}\n", code.as_u16());
        return send_text(respond, head(code, Some(text.len() as u64)), text).await;
    }
    match (parts[0], parts.get(1).copied()) {
        ("bytes", Some(n)) => {
            let n: u64 = n.parse().unwrap_or(0);
            if let Ok(mut tx) = respond.send_response(head(status(200), Some(n)), n == 0) {
                send_pattern(&mut tx, n).await;
                if n > 0 {
                    let _ = tx.send_data(Bytes::new(), true);
                }
            }
        }
        ("reset-after", Some(n)) => {
            let n: u64 = n.parse().unwrap_or(0);
            if let Ok(mut tx) = respond.send_response(head(status(200), None), false) {
                send_pattern(&mut tx, n).await;
                // Let the bytes go out before the reset overtakes them.
                monoio::time::sleep(Duration::from_millis(20)).await;
                tx.send_reset(h2::Reason::INTERNAL_ERROR);
            }
        }
        ("echo", _) => {
            let ct = req.headers().get(http::header::CONTENT_TYPE).cloned();
            let mut h = head(status(200), None);
            if let Some(ct) = ct {
                h.headers_mut().insert(http::header::CONTENT_TYPE, ct);
            }
            let mut body = req.into_body();
            if let Ok(mut tx) = respond.send_response(h, false) {
                while let Some(Ok(chunk)) = body.data().await {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    if !send_all(&mut tx, chunk).await {
                        return;
                    }
                }
                match body.trailers().await {
                    Ok(Some(t)) => {
                        let _ = tx.send_trailers(t);
                    }
                    _ => {
                        let _ = tx.send_data(Bytes::new(), true);
                    }
                }
            }
        }
        ("sink", _) => {
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut n = 0u64;
            while let Some(chunk) = body.data().await {
                let Ok(chunk) = chunk else { return };
                let _ = body.flow_control().release_capacity(chunk.len());
                n += chunk.len() as u64;
                hasher.update(&chunk);
            }
            let text = format!("{{\"bytes\":{n},\"sha256\":\"{}\"}}", hex::encode(hasher.finalize()));
            send_text(respond, head(status(200), Some(text.len() as u64)), text).await;
        }
        ("count", Some(key)) => {
            let mut body = req.into_body();
            while let Some(Ok(chunk)) = body.data().await {
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            let text = format!("{}\n", count(key, 1));
            send_text(respond, head(status(200), Some(text.len() as u64)), text).await;
        }
        ("goaway", _) => {
            let text = "going away\n".to_string();
            send_text(respond, head(status(200), Some(text.len() as u64)), text).await;
            goaway.requested.set(true);
            if let Some(w) = goaway.waker.borrow_mut().take() {
                w.wake();
            }
        }
        ("peek", Some(key)) => {
            let text = format!("{}\n", count(key, 0));
            send_text(respond, head(status(200), Some(text.len() as u64)), text).await;
        }
        ("headers", _) => {
            let mut text = format!(
                ":method: {}\n:scheme: {}\n:authority: {}\n:path: {}\n",
                req.method(),
                req.uri().scheme_str().unwrap_or(""),
                req.uri().authority().map(|a| a.as_str()).unwrap_or(""),
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
            );
            for (k, v) in req.headers() {
                text.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
            send_text(respond, head(status(200), Some(text.len() as u64)), text).await;
        }
        ("status", Some(code)) => {
            let code = code.parse().ok().and_then(|c| StatusCode::from_u16(c).ok()).unwrap_or(StatusCode::BAD_REQUEST);
            let text = format!("status {}\n", code.as_u16());
            send_text(respond, head(code, Some(text.len() as u64)), text).await;
        }
        ("trailers", _) => {
            if let Ok(mut tx) = respond.send_response(head(status(200), None), false) {
                if send_all(&mut tx, Bytes::from_static(b"ok")).await {
                    let mut t = HeaderMap::new();
                    t.insert("grpc-status", HeaderValue::from_static("0"));
                    t.insert("x-trailer", HeaderValue::from_static("yes"));
                    let _ = tx.send_trailers(t);
                }
            }
        }
        _ => {
            let text = format!("hello from {name}\n");
            send_text(respond, head(status(200), Some(text.len() as u64)), text).await;
        }
    }
}

async fn send_text(respond: &mut SendResponse<Bytes>, head: Response<()>, text: String) {
    if let Ok(mut tx) = respond.send_response(head, text.is_empty()) {
        if !text.is_empty() && send_all(&mut tx, Bytes::from(text)).await {
            let _ = tx.send_data(Bytes::new(), true);
        }
    }
}

async fn send_pattern(tx: &mut SendStream<Bytes>, len: u64) {
    const CHUNK: usize = 64 * 1024;
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(CHUNK);
        let mut buf = BytesMut::zeroed(n);
        pattern::fill(off, &mut buf);
        if !send_all(tx, buf.freeze()).await {
            return;
        }
        off += n as u64;
    }
}

/// Sends `data` within HTTP/2 flow control; false if the stream is gone.
async fn send_all(tx: &mut SendStream<Bytes>, mut data: Bytes) -> bool {
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let cap = poll_fn(|cx| crate::runtime::poll_send_capacity(tx, cx)).await;
        let Some(cap) = cap else { return false };
        if tx.send_data(data.split_to(cap.min(data.len())), false).is_err() {
            return false;
        }
    }
    true
}

struct Query {
    delay_ms: u64,
    status: Option<u16>,
}

impl Query {
    fn parse(q: &str) -> Self {
        let mut out = Query { delay_ms: 0, status: None };
        for pair in q.split('&') {
            match pair.split_once('=') {
                Some(("delay_ms", v)) => out.delay_ms = v.parse().unwrap_or(0),
                Some(("status", v)) => out.status = v.parse().ok(),
                _ => {}
            }
        }
        out
    }
}
