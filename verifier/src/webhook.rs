//! Webhook notifications: every verdict change is POSTed as JSON to each
//! configured URL, in order, with retries and exponential backoff.
//!
//! Owns one queue and one delivery task per URL, so a dead receiver delays
//! only itself. Trust boundary: receivers are the operator's; their answers
//! are read only for the status code. Events carry no key material or
//! token values. Plain `http://` only (TLS receivers: put a local relay in
//! front).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// Attempts per event before it is dropped (and logged as such).
pub const MAX_ATTEMPTS: u32 = 8;

/// Webhook errors.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The URL is not `http://host:port/path`.
    #[error("webhook URL {0:?}: expected http://host[:port][/path]")]
    BadUrl(String),
    /// Delivery failed.
    #[error("webhook {url}: {reason}")]
    Delivery {
        /// Receiver.
        url: String,
        /// Why.
        reason: String,
    },
}

/// A parsed receiver URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host (name or IP).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query.
    pub path: String,
    url: String,
}

impl Target {
    /// Parses `http://host[:port][/path]`.
    pub fn parse(url: &str) -> Result<Self, WebhookError> {
        let bad = || WebhookError::BadUrl(url.to_owned());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
                (h, p.parse::<u16>().map_err(|_| bad())?)
            }
            _ => (hostport, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || path.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
            url: url.to_owned(),
        })
    }

    /// POSTs `body` once.
    pub async fn post(&self, body: &[u8]) -> Result<(), WebhookError> {
        let fail = |reason: String| WebhookError::Delivery {
            url: self.url.clone(),
            reason,
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| fail("connect timed out".into()))?
        .map_err(|e| fail(e.to_string()))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(conn);
        let req = hyper::Request::post(self.path.as_str())
            .header("host", format!("{}:{}", self.host, self.port))
            .header("content-type", "application/json")
            .header("user-agent", "vouch-verifier")
            .body(Full::new(bytes::Bytes::copy_from_slice(body)))
            .map_err(|e| fail(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .map_err(|_| fail("no answer within 10 s".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(fail(format!("HTTP {status}")))
        }
    }
}

/// Starts one delivery task per target and returns the queue that feeds
/// them all.
pub fn start(
    targets: Vec<Target>,
) -> tokio::sync::mpsc::UnboundedSender<crate::service::VerdictEvent> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::service::VerdictEvent>();
    let mut queues = Vec::new();
    for t in targets {
        let (qtx, mut qrx) = tokio::sync::mpsc::unbounded_channel::<std::sync::Arc<Vec<u8>>>();
        queues.push(qtx);
        tokio::spawn(async move {
            while let Some(body) = qrx.recv().await {
                let mut delay = Duration::from_millis(100);
                for attempt in 1..=MAX_ATTEMPTS {
                    match t.post(&body).await {
                        Ok(()) => break,
                        Err(e) if attempt == MAX_ATTEMPTS => {
                            tracing::error!(error = %e, attempts = attempt, "webhook delivery given up")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, attempt, retry_in_ms = delay.as_millis() as u64, "webhook delivery failed");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(30));
                        }
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let body = std::sync::Arc::new(ev.to_string().into_bytes());
            for q in &queues {
                let _ = q.send(body.clone());
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A receiver that answers 500 `fail` times, then 204; returns the
    /// bodies it saw.
    async fn receiver(fail: usize) -> (u16, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut n = 0;
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut got = 0;
                // Headers and a small body arrive together on loopback.
                loop {
                    let k = c.read(&mut buf[got..]).await.unwrap();
                    got += k;
                    let text = String::from_utf8_lossy(&buf[..got]).to_string();
                    if let Some(i) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if got >= i + 4 + len || k == 0 {
                            let _ = tx.send(text[i + 4..].to_string());
                            break;
                        }
                    }
                }
                n += 1;
                let status = if n <= fail {
                    "500 Internal Server Error"
                } else {
                    "204 No Content"
                };
                let _ = c
                    .write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (port, rx)
    }

    #[tokio::test]
    async fn failed_deliveries_are_retried_until_accepted() {
        let (port, mut rx) = receiver(2).await;
        let t = Target::parse(&format!("http://127.0.0.1:{port}/hook")).unwrap();
        let tx = start(vec![t]);
        tx.send(serde_json::json!({"to": "contraindicated"}))
            .unwrap();
        // Two refusals, then the same body accepted (backoff 100, 200 ms).
        for _ in 0..3 {
            let body = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(body, r#"{"to":"contraindicated"}"#);
        }
        assert!(tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err());
    }

    #[test]
    fn urls() {
        let t = Target::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.path.as_str()),
            ("127.0.0.1", 8080, "/hook?x=1")
        );
        let t = Target::parse("http://example.org").unwrap();
        assert_eq!((t.port, t.path.as_str()), (80, "/"));
        let t = Target::parse("http://[::1]:9/").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 9));
        for bad in [
            "https://x/",
            "http://:80/",
            "http://x:port/",
            "ftp://x",
            "http://x/a b",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
