//! The HTTP side of `--metrics`: hyper 1 (HTTP/1.1) on the agent's runtime, `GET /metrics`
//! only. Each connection has a task of its own, a bound on its header read and on its whole
//! life, and at most [`MAX_CONNECTIONS`] are served at once; the classifier's counters are
//! asked of the serve loop (see the module docs of [`super`]).

use std::{convert::Infallible, io, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, header, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use log::{debug, info, warn};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{ClassifierSnapshot, exposition};

/// How long a scrape waits for the serve loop's snapshot of the classifier's counters.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(2);
/// Scrape connections served at once; more are closed as they arrive.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a scrape connection may live in all.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// Snapshot requests waiting for the serve loop; a scrape that finds the queue full
/// answers without the classifier's families.
const QUEUE: usize = 4;

/// Where the serve loop sends one snapshot.
pub type SnapshotReply = oneshot::Sender<ClassifierSnapshot>;

/// `--metrics` could not listen.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another socket holds the address and port.
    #[error("--metrics {0}: the address is already in use")]
    InUse(SocketAddr),
    /// Any other failure to bind or listen.
    #[error("--metrics {0}: cannot listen there")]
    Bind(SocketAddr, #[source] io::Error),
}

/// The snapshot requests the serve loop answers; never any without `--metrics`. Also a
/// copy of the listening socket, with its address, to hand over to the next agent.
pub struct Requests(
    Option<mpsc::Receiver<SnapshotReply>>,
    Option<(SocketAddr, std::os::fd::OwnedFd)>,
);

impl Requests {
    /// A copy of the listening socket and its address.
    pub fn listener(&self) -> Option<(SocketAddr, std::os::fd::OwnedFd)> {
        let (addr, fd) = self.1.as_ref()?;
        Some((*addr, fd.try_clone().ok()?))
    }

    /// The next request; pending forever without `--metrics`.
    pub async fn next(&mut self) -> SnapshotReply {
        if let Some(rx) = &mut self.0
            && let Some(reply) = rx.recv().await
        {
            return reply;
        }
        std::future::pending().await
    }
}

/// Binds `--metrics` (a port in use fails the start here, before anything changes), or
/// takes the previous agent's listener at the same address, and serves it on a task of its
/// own; returns what the serve loop answers.
pub fn start(
    addr: Option<SocketAddr>,
    inherited: Option<(SocketAddr, std::net::TcpListener)>,
) -> Result<Requests, MetricsError> {
    let Some(addr) = addr else {
        return Ok(Requests(None, None));
    };
    let bound = match inherited {
        Some((at, listener)) if at == addr => Ok(listener),
        _ => std::net::TcpListener::bind(addr),
    };
    let copy = bound
        .as_ref()
        .ok()
        .and_then(|l| l.try_clone().ok())
        .map(|l| (addr, std::os::fd::OwnedFd::from(l)));
    let listener = bound
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AddrInUse => MetricsError::InUse(addr),
            _ => MetricsError::Bind(addr, e),
        })?;
    let (tx, rx) = mpsc::channel(QUEUE);
    info!("metrics: http://{addr}/metrics");
    tokio::spawn(serve(listener, tx, exposition::kernel_release()));
    Ok(Requests(Some(rx), copy))
}

async fn serve(
    listener: tokio::net::TcpListener,
    requests: mpsc::Sender<SnapshotReply>,
    kernel_release: String,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let kernel_release: Arc<str> = kernel_release.into();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            debug!("metrics: {MAX_CONNECTIONS} scrapes already open, connection closed");
            continue;
        };
        let requests = requests.clone();
        let kernel_release = Arc::clone(&kernel_release);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                answer(request, requests.clone(), Arc::clone(&kernel_release))
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                debug!("metrics: {e}");
            }
            drop(permit);
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    requests: mpsc::Sender<SnapshotReply>,
    kernel_release: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found: try /metrics\n"));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n"));
    }
    let snapshot = snapshot(&requests).await;
    let text = exposition::encode(snapshot.as_ref(), &kernel_release);
    let mut response = Response::new(Full::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(exposition::CONTENT_TYPE),
    );
    Ok(response)
}

/// Asks the serve loop for the classifier's counters; none if the queue is full or the
/// loop does not answer within [`SNAPSHOT_TIMEOUT`].
async fn snapshot(requests: &mpsc::Sender<SnapshotReply>) -> Option<ClassifierSnapshot> {
    let (tx, rx) = oneshot::channel();
    requests.try_send(tx).ok()?;
    match tokio::time::timeout(SNAPSHOT_TIMEOUT, rx).await {
        Ok(Ok(snapshot)) => Some(snapshot),
        _ => {
            debug!("metrics: no classifier snapshot within {SNAPSHOT_TIMEOUT:?}");
            None
        }
    }
}
