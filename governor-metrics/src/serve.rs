//! The HTTP side: `GET /metrics` on a loopback listener.
//!
//! Plain HTTP/1.1 through `hyper`'s connection API, with no router or
//! framework: there is one path. Per connection:
//! * its own task, so a slow client only slows itself;
//! * a header read timeout (hyper's, driven by tokio's timer) that also
//!   closes idle keep-alive connections, so silent clients do not pile up;
//! * a cap on simultaneous connections: at the cap, accepting waits for one
//!   to finish (new clients queue in the kernel's backlog meanwhile).
//!
//! Each scrape asks the daemon for a fresh snapshot, bounded by a timeout so
//! a stuck daemon gives a prompt 503 instead of a hung scrape. All tasks
//! live in a [`JoinSet`] owned by the serving future: dropping it (aborting
//! the task that runs [`serve`]) closes the listener and every connection.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// Limits of the server; [`serve`] uses [`Limits::DEFAULT`], tests shorten
/// them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// A request's headers must arrive within this; it also bounds how long
    /// an idle keep-alive connection stays open.
    pub header_read_timeout: Duration,
    /// How long one snapshot may take before the scrape gets a 503.
    pub fetch_timeout: Duration,
    /// Simultaneous connections.
    pub max_connections: usize,
}

impl Limits {
    /// Prometheus' default scrape timeout is 10 s and its keep-alive
    /// connections come back every scrape interval (15 s–1 min), so an idle
    /// connection is simply reopened by the next scrape. A few local scrapers
    /// at most, so a small connection cap.
    pub const DEFAULT: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        fetch_timeout: Duration::from_secs(8),
        max_connections: 16,
    };
}

/// Wait after an accept error (e.g. out of file descriptors) before trying
/// again, rather than spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves GET /metrics (200, correct content type) and 404 for other paths, 405 for other methods, on an already-bound listener,
/// until the listener task is dropped. Each scrape calls `fetch` for a fresh snapshot; a fetch error → 503 with the message.
/// One slow client must not block the others (a task per connection, a header read timeout).
///
/// Returns an error only if the listener is not bound to a loopback address
/// (see [`crate::check_listen`]); accept errors are logged and retried.
/// `HEAD /metrics` is answered like `GET` without a body. The content type is
/// [`crate::CONTENT_TYPE`].
pub async fn serve<F, Fut>(listener: TcpListener, fetch: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    serve_with(listener, fetch, Limits::DEFAULT).await
}

pub(crate) async fn serve_with<F, Fut>(
    listener: TcpListener,
    fetch: F,
    limits: Limits,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, String>> + Send + 'static,
{
    let local = listener.local_addr()?;
    crate::check_listen(&local).map_err(anyhow::Error::msg)?;

    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);

    let mut connections = JoinSet::new();
    loop {
        while let Some(done) = connections.try_join_next() {
            reap(done);
        }
        if connections.len() >= limits.max_connections {
            if let Some(done) = connections.join_next().await {
                reap(done);
            }
            continue;
        }

        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                log::warn!("metrics {local}: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Responses are written whole; don't let Nagle delay their tail.
        let _ = stream.set_nodelay(true);

        let fetch = fetch.clone();
        let service = service_fn(move |request| respond(request, fetch.clone(), limits));
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                // Timeouts and clients going away are routine.
                log::debug!("metrics {local}: connection from {peer}: {e}");
            }
        });
    }
}

fn reap(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            log::error!("metrics: a connection task panicked: {e}");
        }
    }
}

async fn respond<F, Fut>(
    request: Request<Incoming>,
    fetch: F,
    limits: Limits,
) -> Result<Response<Full<Bytes>>, Infallible>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<Value, String>>,
{
    if request.uri().path() != "/metrics" {
        return Ok(plain(
            StatusCode::NOT_FOUND,
            "not found: governor serves only /metrics\n".into(),
        ));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "method {} not allowed on /metrics: use GET\n",
                request.method()
            ),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }

    let snapshot = match tokio::time::timeout(limits.fetch_timeout, fetch()).await {
        Ok(Ok(snapshot)) => snapshot,
        Ok(Err(message)) => {
            log::warn!("metrics: no snapshot: {message}");
            return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, message + "\n"));
        }
        Err(_) => {
            let message = format!(
                "the daemon gave no snapshot within {:?}",
                limits.fetch_timeout
            );
            log::warn!("metrics: {message}");
            return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, message + "\n"));
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(crate::render(&snapshot))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(crate::CONTENT_TYPE));
    Ok(response)
}

fn plain(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::net::SocketAddr;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const SHORT: Limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        fetch_timeout: Duration::from_millis(300),
        max_connections: 2,
    };

    async fn start<F, Fut>(fetch: F) -> (SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)
    where
        F: Fn() -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, String>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, tokio::spawn(serve_with(listener, fetch, SHORT)))
    }

    async fn get(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    /// Reads until the server closes; returns how long that took.
    async fn closed_after(mut stream: TcpStream) -> Duration {
        let start = Instant::now();
        let mut sink = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink));
        let _ = read.await.expect("server closed the connection");
        start.elapsed()
    }

    #[tokio::test]
    async fn silent_and_idle_connections_are_closed() {
        let (addr, server) = start(|| async { Ok(json!({})) }).await;
        // Never sends a byte.
        let silent = TcpStream::connect(addr).await.expect("connect");
        assert!(closed_after(silent).await < Duration::from_secs(3));
        // Sends half a request line.
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        partial.write_all(b"GET /met").await.expect("send");
        assert!(closed_after(partial).await < Duration::from_secs(3));
        server.abort();
    }

    #[tokio::test]
    async fn the_connection_cap_only_delays() {
        let (addr, server) = start(|| async { Ok(json!({"bounds": {"processes": 1}})) }).await;
        // Fill the cap with silent clients; the next scrape waits for the
        // header timeout to free a slot, then succeeds.
        let _a = TcpStream::connect(addr).await.expect("connect");
        let _b = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let response = tokio::time::timeout(Duration::from_secs(5), get(addr))
            .await
            .expect("served once a slot freed");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(response.contains("governor_processes 1"), "{response}");
        server.abort();
    }

    #[tokio::test]
    async fn a_hung_fetch_is_a_503() {
        let (addr, server) = start(|| async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(json!({}))
        })
        .await;
        let response = tokio::time::timeout(Duration::from_secs(5), get(addr))
            .await
            .expect("answered");
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(response.contains("no snapshot within"), "{response}");
        server.abort();
    }
}
