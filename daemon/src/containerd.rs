//! Image lookups through containerd's gRPC API (unix socket, metadata
//! `containerd-namespace`).
//!
//! Reports the image *manifest* digest: containerd's container record holds
//! only the image name, so the digest is the image store's current target
//! for that name. Guard against a moved tag: if the image record was updated
//! after the container was created, the name may now point elsewhere than
//! what runs, and no digest is reported (an error field says why).
//! Trust boundary: containerd runs as root on the node and is trusted as the
//! node's runtime; its answers are still size-limited and checked.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::measure::ImageResolver;

#[allow(
    missing_docs,
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
mod api {
    pub mod containers {
        tonic::include_proto!("containerd.services.containers.v1");
    }
    pub mod images {
        tonic::include_proto!("containerd.services.images.v1");
    }
}

/// A containerd client for image lookups.
#[derive(Debug)]
pub struct Containerd {
    socket: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
    channel: Option<Channel>,
}

impl Containerd {
    /// A client for the socket at `socket` (connected lazily).
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok(),
            channel: None,
        }
    }

    async fn connect(socket: PathBuf) -> Result<Channel, String> {
        // The URI is required by tonic but unused: the connector dials the
        // unix socket.
        Endpoint::from_static("http://containerd.invalid")
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_| {
                let p = socket.clone();
                async move { tokio::net::UnixStream::connect(p).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| format!("connecting to containerd: {e}"))
    }

    async fn lookup(channel: Channel, ns: String, id: String) -> Result<(String, String), String> {
        let mut containers =
            api::containers::containers_client::ContainersClient::new(channel.clone())
                .max_decoding_message_size(4 << 20);
        let c = containers
            .get(with_ns(
                &ns,
                api::containers::GetContainerRequest { id: id.clone() },
            )?)
            .await
            .map_err(|e| format!("containerd Containers.Get({id}): {}", e.message()))?
            .into_inner()
            .container
            .ok_or_else(|| format!("containerd has no record of container {id}"))?;
        if c.image.is_empty() {
            return Err(format!("container {id} has no image"));
        }
        let mut images = api::images::images_client::ImagesClient::new(channel)
            .max_decoding_message_size(4 << 20);
        let img = images
            .get(with_ns(
                &ns,
                api::images::GetImageRequest {
                    name: c.image.clone(),
                },
            )?)
            .await
            .map_err(|e| format!("containerd Images.Get({}): {}", c.image, e.message()))?
            .into_inner()
            .image
            .ok_or_else(|| format!("image {} not in containerd's store", c.image))?;
        let digest = img
            .target
            .map(|t| t.digest)
            .filter(|d| d.starts_with("sha256:") && d.len() == 71)
            .ok_or_else(|| format!("image {} has no sha256 manifest digest", c.image))?;
        let ts = |t: &Option<prost_types::Timestamp>| t.as_ref().map(|t| (t.seconds, t.nanos));
        if let (Some(updated), Some(created)) = (ts(&img.updated_at), ts(&c.created_at)) {
            if updated > created {
                return Err(format!(
                    "image name {} was re-pointed after container {id} was created (tag moved?): digest not reported",
                    c.image
                ));
            }
        }
        Ok((c.image, digest))
    }
}

fn with_ns<T>(ns: &str, msg: T) -> Result<tonic::Request<T>, String> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "containerd-namespace",
        ns.parse()
            .map_err(|_| format!("bad containerd namespace {ns:?}"))?,
    );
    Ok(r)
}

impl ImageResolver for Containerd {
    fn resolve(&mut self, ns: &str, id: &str, _pid: u32) -> Result<(String, String), String> {
        let rt = self
            .rt
            .as_ref()
            .ok_or("no async runtime for containerd lookups")?;
        let channel = match &self.channel {
            Some(c) => c.clone(),
            None => {
                let c = rt.block_on(Self::connect(self.socket.clone()))?;
                self.channel = Some(c.clone());
                c
            }
        };
        let r = rt.block_on(Self::lookup(channel, ns.to_owned(), id.to_owned()));
        if r.is_err() {
            // Reconnect next time (containerd may have restarted).
            self.channel = None;
        }
        r
    }
}
