//! The one way every HTTP endpoint is served (metrics and health, the audit dashboard, STOW-RS),
//! with what `axum::serve` leaves open to a careless or hostile client: a connection must send
//! its request headers within [`HEADER_READ_TIMEOUT`] (a client that trickles them would hold a
//! task and a socket forever), the header block is bounded, and at most [`MAX_CONNECTIONS`]
//! are open at once (past that a connection is closed unanswered, so a flood cannot take the
//! process's descriptors). Request bodies are each handler's business (STOW-RS caps and times
//! its own).
//!
//! Also the one small HTTP client call a stage makes itself, [`post_json`] (the audit sink's
//! alert webhook); spans leave through the OpenTelemetry SDK's own exporter.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Time a connection has to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once, per endpoint.
pub const MAX_CONNECTIONS: usize = 256;
/// Request header fields accepted; hyper refuses more with 431.
const MAX_HEADERS: usize = 64;
/// After shutdown, how long requests in hand may take to finish.
const DRAIN: Duration = Duration::from_secs(30);

/// Refuses an address that is not loopback when nothing guards the endpoint: anyone who can
/// reach the port could use it. `what` names the endpoint and `remedy` says how to guard it.
pub fn loopback_unless_guarded(
    addr: SocketAddr,
    guarded: bool,
    what: &str,
    remedy: &str,
) -> std::io::Result<()> {
    if guarded || addr.ip().is_loopback() {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "refusing to serve {what} on {addr} without a token: {remedy}, or bind to a \
             loopback address such as 127.0.0.1"
        ),
    ))
}

/// Serves `router` on `listener` until `shutdown` completes, then lets the requests in hand
/// finish (up to 30 s).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %peer, limit = MAX_CONNECTIONS, "too many connections, closing one unanswered");
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(peer = %peer, error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still open after the drain period, closing them");
    }
    Ok(())
}

/// A POST that did not succeed; the message says where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostError {
    #[error("{0:?} must start with http://")]
    NotHttp(String),
    #[error("cannot reach {host}: {reason}")]
    Io { host: String, reason: String },
    #[error("{host} answered {status:?}")]
    Status { host: String, status: String },
    #[error("{0} did not answer within 5 s")]
    Timeout(String),
}

/// POSTs a JSON body to `url` (`http://host:port/path`), e.g. an alert webhook, as plain
/// HTTP/1.1 with a 5 s timeout.
pub async fn post_json(url: &str, body: &[u8]) -> Result<(), PostError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| PostError::NotHttp(url.to_string()))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/".into()));
    let io_error = |e: std::io::Error| PostError::Io {
        host: host.to_string(),
        reason: e.to_string(),
    };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(io_error)?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.map_err(io_error)?;
        s.write_all(body).await.map_err(io_error)?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.map_err(io_error)?;
        let status = String::from_utf8_lossy(&resp)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if status
            .split_whitespace()
            .nth(1)
            .is_some_and(|c| c.starts_with('2'))
        {
            Ok(())
        } else {
            Err(PostError::Status {
                host: host.to_string(),
                status,
            })
        }
    };
    tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| PostError::Timeout(host.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn endpoint() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let router = Router::new().route("/", get(|| async { "ok" }));
        tokio::spawn(serve(listener, router, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    async fn answer(stream: &mut tokio::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buf)).await;
        String::from_utf8_lossy(&buf).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_trickles_its_headers_is_cut_off_and_others_are_served() {
        let (addr, _stop) = endpoint().await;
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut cut = false;
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
                cut = true;
                break;
            }
            let mut b = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1), slow.read(&mut b)).await
            {
                cut = true;
                break;
            }
        }
        assert!(cut, "the trickling client still holds its connection");
        assert!(started.elapsed() < Duration::from_secs(20));
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(answer(&mut ok).await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn too_many_header_fields_are_refused() {
        let (addr, _stop) = endpoint().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut req = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
        for i in 0..200 {
            req.push_str(&format!("X-H{i}: v\r\n"));
        }
        req.push_str("Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let got = answer(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    }

    #[tokio::test]
    async fn post_json_posts_the_body_and_reports_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
        let keep = got.clone();
        let router = Router::new()
            .route(
                "/hook",
                axum::routing::post(move |body: axum::body::Bytes| async move {
                    keep.lock().unwrap().extend_from_slice(&body);
                    "{}"
                }),
            )
            .route(
                "/full",
                axum::routing::post(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
            );
        tokio::spawn(serve(listener, router, std::future::pending::<()>()));
        post_json(&format!("http://{addr}/hook"), br#"{"kind":"drift"}"#)
            .await
            .unwrap();
        assert_eq!(&*got.lock().unwrap(), br#"{"kind":"drift"}"#);
        let refused = post_json(&format!("http://{addr}/full"), b"{}").await;
        assert!(
            matches!(&refused, Err(PostError::Status { status, .. }) if status.contains("503")),
            "{refused:?}"
        );
        assert_eq!(
            post_json("https://alerts.invalid/hook", b"{}").await,
            Err(PostError::NotHttp("https://alerts.invalid/hook".into()))
        );
    }

    #[test]
    fn an_unguarded_endpoint_is_refused_beyond_loopback() {
        let open: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let e = loopback_unless_guarded(open, false, "STOW-RS", "set a token").unwrap_err();
        assert!(e.to_string().contains("without a token"), "{e}");
        assert!(loopback_unless_guarded(open, true, "STOW-RS", "set a token").is_ok());
        assert!(loopback_unless_guarded(local, false, "STOW-RS", "set a token").is_ok());
    }
}
