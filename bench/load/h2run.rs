//! One load-generator thread speaking HTTP/2 cleartext (prior knowledge) straight to the
//! backend: the "direct" floor every proxy is compared against. A monoio runtime per thread;
//! `streams` tasks per connection, each looping request → response.

use crate::pacer::Pacer;
use crate::plan::{Mode, Plan, RequestSpec};
use crate::stats::{Progress, Stats};
use bytes::Bytes;
use h2::client::SendRequest;
use monoio::io::IntoPollIo;
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// The end of a paced wait that is spent yielding rather than on the millisecond timer.
const SPIN: Duration = Duration::from_millis(1);

/// State shared by the tasks of one thread.
struct Shared<'a> {
    plan: &'a Plan,
    progress: &'a Progress,
    stats: RefCell<Stats>,
    pacer: RefCell<Pacer>,
    issued: std::cell::Cell<u64>,
    start: Instant,
    body: Bytes,
}

impl Shared<'_> {
    /// Claims the next request (its intended start), or `None` when the window is over.
    fn claim(&self) -> Option<Instant> {
        let now = Instant::now();
        let finished = self.stats.borrow().finished();
        if self.plan.window_over(self.start, now, finished) || !self.plan.may_issue(self.issued.get()) {
            return None;
        }
        self.issued.set(self.issued.get() + 1);
        Some(self.pacer.borrow_mut().claim(now))
    }

    fn window_end(&self) -> Instant {
        self.plan.duration.map_or(self.plan.deadline, |d| (self.start + d).min(self.plan.deadline))
    }
}

pub fn run(plan: &Plan, progress: &Progress, barrier: &Barrier) -> anyhow::Result<Stats> {
    if plan.mode == Mode::Idle {
        anyhow::bail!("--idle is for HTTP/3 only");
    }
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new().enable_timer().build()?;
    rt.block_on(run_async(plan, progress, barrier))
}

async fn run_async(plan: &Plan, progress: &Progress, barrier: &Barrier) -> anyhow::Result<Stats> {
    let mut body = vec![0u8; 64 * 1024];
    spooky::tools::pattern::fill(0, &mut body);
    let mut senders = Vec::new();
    let mut setup = Stats::default();
    if plan.mode == Mode::Load {
        for _ in 0..plan.connections {
            match connect(plan).await {
                Ok(s) => senders.push(s),
                Err(_) => setup.error(progress, "connect"),
            }
        }
        setup.connections = senders.len() as u64;
    }
    barrier.wait();
    let start = Instant::now();
    let shared = Rc::new(Shared {
        plan,
        progress,
        stats: RefCell::new(setup),
        pacer: RefCell::new(Pacer::new(plan.rate, start)),
        issued: std::cell::Cell::new(0),
        start,
        body: Bytes::from(body),
    });
    // The tasks borrow `plan` and `progress`, which outlive this function's future: run them
    // all to completion here with a join rather than detached spawns.
    let mut tasks = Vec::new();
    match plan.mode {
        Mode::Load => {
            for s in &senders {
                for _ in 0..plan.streams {
                    tasks.push(stream_loop(shared.clone(), s.clone()));
                }
            }
            futures::future::join_all(tasks).await;
        }
        _ => {
            let tasks: Vec<_> = (0..plan.connections).map(|_| new_conn_loop(shared.clone())).collect();
            futures::future::join_all(tasks).await;
        }
    }
    let mut stats = shared.stats.replace(Stats::default());
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Opens one h2c connection; its driver runs as a detached task.
async fn connect(plan: &Plan) -> anyhow::Result<SendRequest<Bytes>> {
    let tcp = monoio::net::TcpStream::connect(plan.peer).await?;
    tcp.set_nodelay(true)?;
    let io = tcp.into_poll_io()?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .max_frame_size(64 << 10)
        .handshake::<_, Bytes>(io)
        .await?;
    monoio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn stream_loop(shared: Rc<Shared<'_>>, send: SendRequest<Bytes>) {
    while let Some(intended) = shared.claim() {
        sleep_until(intended, shared.window_end()).await;
        let outcome = request(&shared.plan.request, &shared.body, send.clone()).await;
        record(&shared, intended, outcome);
    }
}

async fn new_conn_loop(shared: Rc<Shared<'_>>) {
    while let Some(intended) = shared.claim() {
        sleep_until(intended, shared.window_end()).await;
        let send = match connect(shared.plan).await {
            Ok(s) => s,
            Err(_) => {
                shared.stats.borrow_mut().error(shared.progress, "connect");
                continue;
            }
        };
        shared.stats.borrow_mut().handshakes += 1;
        Progress::add(&shared.progress.handshakes, 1);
        let outcome = request(&shared.plan.request, &shared.body, send).await;
        record(&shared, intended, outcome);
    }
}

fn record(shared: &Shared<'_>, intended: Instant, outcome: Result<(u16, u64, u64), &'static str>) {
    let mut stats = shared.stats.borrow_mut();
    match outcome {
        Ok((status, down, up)) => {
            stats.bytes_up += up;
            stats.response(shared.progress, intended.elapsed(), status, down);
        }
        Err(kind) => stats.error(shared.progress, kind),
    }
}

/// Waits until `t` (capped at `limit`): monoio's millisecond timer for most of the wait, then
/// yielding for the last [`SPIN`] so open-loop sends start on time.
async fn sleep_until(t: Instant, limit: Instant) {
    let t = t.min(limit);
    let now = Instant::now();
    if t > now + SPIN {
        monoio::time::sleep(t - now - SPIN).await;
    }
    while Instant::now() < t {
        spooky::runtime::yield_now().await;
    }
}

/// One request; returns (status, bytes down, bytes up).
async fn request(spec: &RequestSpec, chunk: &Bytes, send: SendRequest<Bytes>) -> Result<(u16, u64, u64), &'static str> {
    let mut send = send.ready().await.map_err(|_| "connection")?;
    let mut req = http::Request::builder()
        .method(spec.method.as_str())
        .uri(format!("http://{}{}", spec.authority, spec.path))
        .header("user-agent", "spooky-load");
    if spec.body > 0 {
        req = req.header("content-length", spec.body);
    }
    let req = req.body(()).map_err(|_| "bad request")?;
    let (resp, mut stream) = send.send_request(req, spec.body == 0).map_err(|_| "send_request")?;
    let mut up = 0u64;
    while up < spec.body {
        let want = ((spec.body - up) as usize).min(chunk.len());
        stream.reserve_capacity(want);
        let cap = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(c)) => c.min(want),
            _ => return Err("upload"),
        };
        if cap == 0 {
            continue;
        }
        let eos = up + cap as u64 == spec.body;
        stream.send_data(chunk.slice(..cap), eos).map_err(|_| "upload")?;
        up += cap as u64;
    }
    let resp = resp.await.map_err(|_| "response")?;
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut down = 0u64;
    while let Some(data) = body.data().await {
        let data = data.map_err(|_| "response body")?;
        down += data.len() as u64;
        let _ = body.flow_control().release_capacity(data.len());
    }
    Ok((status, down, up))
}
