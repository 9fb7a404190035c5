//! A small HTTP/1.1 server for the admin listener, built so that no client can hurt the proxy:
//! one thread running its own event loop (monoio), so a slow client costs a task, not a
//! thread; at most [`Limits::connections`] connections at once (a new one closes the oldest,
//! so connections held open by a slowloris client cannot lock out a health check); a
//! request head of at most [`Limits::head`] bytes (else 431) that must arrive within
//! [`Limits::head_timeout`] (else the connection closes); keep-alive connections closed after
//! [`Limits::idle_timeout`]. Request bodies are not read: admin requests carry none (a request
//! announcing one gets 413), and every response closes its connection if its request had one.
//!
//! The handler is synchronous and must answer at once (a reload is only started from it).

use futures::channel::oneshot;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

/// The bounds of the listener.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub connections: usize,
    pub head: usize,
    pub head_timeout: Duration,
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 64,
            head: 8 * 1024,
            head_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    /// The first value of header `name` (case-insensitive), trimmed.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// A complete response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Response { status, content_type: "text/plain", body: body.into() }
    }
}

/// Binds `addr` (on the calling thread, so a bind error is the caller's) and serves it on a
/// new thread with `handler`; returns the bound address.
pub fn serve<H>(addr: std::net::SocketAddr, limits: Limits, handler: H) -> anyhow::Result<std::net::SocketAddr>
where
    H: Fn(&Request) -> Response + Send + 'static,
{
    let std_listener = std::net::TcpListener::bind(addr)?;
    let bound = std_listener.local_addr()?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("spooky-admin".into()).spawn(move || {
        let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!(error = %e, "admin listener runtime failed; the admin listener is off"),
        };
        rt.block_on(async move {
            let listener = match TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "admin listener socket failed"),
            };
            accept_loop(listener, limits, Rc::new(handler)).await
        })
    })?;
    Ok(bound)
}

/// Open connections in accept order, each with its id and the means to close it.
type OpenConnections = VecDeque<(u64, oneshot::Sender<()>)>;

async fn accept_loop<H: Fn(&Request) -> Response + 'static>(listener: TcpListener, limits: Limits, handler: Rc<H>) {
    let open: Rc<RefCell<OpenConnections>> = Rc::default();
    for id in 0u64.. {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, usually: wait a little rather than spin.
                tracing::warn!(error = %e, "admin listener accept failed");
                monoio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.borrow().len() >= limits.connections {
            if let Some((_, close)) = open.borrow_mut().pop_front() {
                metrics::counter!("spooky_admin_connections_evicted_total").increment(1);
                let _ = close.send(());
            }
        }
        let (close, closed) = oneshot::channel();
        open.borrow_mut().push_back((id, close));
        let (open, handler) = (open.clone(), handler.clone());
        monoio::spawn(async move {
            let serve = std::pin::pin!(connection(stream, limits, &*handler));
            // Either way the stream is dropped (closed) here.
            let _ = futures::future::select(serve, closed).await;
            open.borrow_mut().retain(|(other, _)| *other != id);
        });
    }
}

/// Serves one connection until the client closes it, breaks a limit, or idles.
async fn connection<H: Fn(&Request) -> Response>(mut stream: TcpStream, limits: Limits, handler: &H) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // The first byte may take up to the idle timeout; the rest of the head, the head's.
        let head = match read_head(&mut stream, &mut buf, limits).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(status) => {
                let _ = write(&mut stream, &Response::text(status, "bad request\n"), false).await;
                return;
            }
        };
        let (response, keep_alive) = match parse(&head) {
            // Admin requests carry no body: one is refused unread, and the connection closed.
            Ok((_, true, _)) => (Response::text(413, "admin requests carry no body\n"), false),
            Ok((request, false, keep_alive)) => (handler(&request), keep_alive),
            Err(()) => (Response::text(400, "bad request\n"), false),
        };
        if write(&mut stream, &response, keep_alive).await.is_err() || !keep_alive {
            return;
        }
    }
}

/// Reads one request head (through the blank line); what follows it stays in `buf` for the
/// next. `Ok(None)` when the client closed or idled out before sending anything,
/// `Err(status)` on a limit.
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>, limits: Limits) -> Result<Option<Vec<u8>>, u16> {
    let mut deadline = monoio::time::Instant::now() + limits.idle_timeout;
    loop {
        if let Some(end) = find_blank_line(buf) {
            let rest = buf.split_off(end);
            return Ok(Some(std::mem::replace(buf, rest)));
        }
        if buf.len() >= limits.head {
            return Err(431);
        }
        let chunk = Vec::with_capacity(2048.min(limits.head - buf.len()));
        let read = monoio::time::timeout_at(deadline, stream.read(chunk)).await;
        match read {
            Err(_) if buf.is_empty() => return Ok(None),
            Err(_) => return Err(408),
            Ok((Ok(0), _)) => return Ok(None),
            Ok((Ok(_), chunk)) => {
                if buf.is_empty() {
                    deadline = monoio::time::Instant::now() + limits.head_timeout;
                }
                buf.extend_from_slice(&chunk);
            }
            Ok((Err(_), _)) => return Ok(None),
        }
    }
}

fn find_blank_line(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The request line and headers; whether a body was announced; whether to keep the
/// connection open after answering.
fn parse(head: &[u8]) -> Result<(Request, bool, bool), ()> {
    let text = std::str::from_utf8(head).map_err(|_| ())?;
    let mut lines = text.split("\r\n");
    let mut start = lines.next().ok_or(())?.split(' ');
    let (method, target, version) = (start.next().ok_or(())?, start.next().ok_or(())?, start.next().ok_or(())?);
    if start.next().is_some() || !matches!(version, "HTTP/1.1" | "HTTP/1.0") || !target.starts_with('/') {
        return Err(());
    }
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or(())?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(());
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let request =
        Request { method: method.to_string(), path: target.split('?').next().unwrap_or("").to_string(), headers };
    let body = request.header("transfer-encoding").is_some()
        || request.header("content-length").is_some_and(|n| n.trim() != "0");
    let close = request.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
    Ok((request, body, version == "HTTP/1.1" && !close))
}

async fn write(stream: &mut TcpStream, r: &Response, keep_alive: bool) -> std::io::Result<()> {
    let reason = match r.status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n",
        r.status,
        r.content_type,
        r.body.len()
    );
    let (result, _) = stream.write_all([head.into_bytes(), r.body.clone().into_bytes()].concat()).await;
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_are_parsed_strictly() {
        let (r, body, keep) = parse(b"GET /config?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9901\r\nX-A:  b \r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str(), body, keep), ("GET", "/config", false, true));
        assert_eq!((r.header("host"), r.header("x-a")), (Some("127.0.0.1:9901"), Some("b")));
        let (_, body, keep) = parse(b"POST /reload HTTP/1.1\r\ncontent-length: 5\r\n\r\n").unwrap();
        assert!(body && keep);
        let (_, _, keep) = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(!keep, "HTTP/1.0 closes");
        for bad in [
            &b"GET /\r\n\r\n"[..],
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
