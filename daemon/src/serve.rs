//! Node-local sockets for attested sidecars: binding them (mode 0660,
//! optional group), accepting connections with the kernel's identity of
//! the caller attached ([`PeerIo`]), and optionally TLS on top.
//!
//! Trust boundary: anything that can open the socket may connect; what it
//! gets is decided per request from [`Peer`], which the kernel filled in.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use crate::creds::Peer;

/// A connection with the identity of the process that opened it.
pub struct PeerIo<T> {
    io: T,
    peer: Arc<Peer>,
}

impl<T> Connected for PeerIo<T> {
    type ConnectInfo = Arc<Peer>;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PeerIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PeerIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The caller of a request served over [`PeerIo`] (directly or under TLS).
pub fn peer_of<B>(r: &tonic::Request<B>) -> Option<Arc<Peer>> {
    r.extensions().get::<Arc<Peer>>().cloned().or_else(|| {
        r.extensions()
            .get::<tonic::transport::server::TlsConnectInfo<Arc<Peer>>>()
            .map(|t| t.get_ref().clone())
    })
}

/// Binds a unix socket at `path` (replacing a stale one), mode 0660, owned
/// by group `gid` when given.
pub fn bind(path: &Path, gid: Option<u32>) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    if let Some(g) = gid {
        std::os::unix::fs::chown(path, None, Some(g))?;
    }
    Ok(l)
}

/// Accepted connections with their peer identity, as a stream for
/// tonic's `serve_with_incoming`.
pub fn incoming(
    l: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<PeerIo<UnixStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => match Peer::of(&s) {
                    Ok(p) => {
                        let io = PeerIo {
                            io: s,
                            peer: Arc::new(p),
                        };
                        if tx.send(Ok(io)).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "connection without peer credentials dropped")
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Like [`incoming`], with a TLS handshake (certificate from `acceptor`)
/// after the peer is identified; handshakes run concurrently and time out.
pub fn incoming_tls(
    l: UnixListener,
    acceptor: tokio_rustls::TlsAcceptor,
) -> impl tokio_stream::Stream<Item = std::io::Result<PeerIo<tokio_rustls::server::TlsStream<UnixStream>>>>
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (s, _) = match l.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let peer = match Peer::of(&s) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    tracing::warn!(error = %e, "connection without peer credentials dropped");
                    continue;
                }
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(s)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(PeerIo { io: tls, peer })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(pid = peer.pid, error = %e, "TLS handshake failed")
                    }
                    Err(_) => tracing::debug!(pid = peer.pid, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The rustls crypto provider for node-local TLS: ring, the crypto the
/// whole workspace uses (tonic's tls-ring). rustls marks it deprecated for
/// lacking post-quantum key exchange, which a node-local unix socket does
/// not need.
#[allow(deprecated)]
pub fn tls_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}
