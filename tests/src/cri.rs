//! Pulling images the way kubelet does: the CRI `PullImage` call over
//! containerd's socket, which runs the pull inside the containerd daemon.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, PullImageRequest};
use tonic::transport::{Endpoint, Uri};

/// Pulls `image` through containerd's CRI plugin and returns the image
/// reference the runtime reports.
pub fn pull_image(socket: &Path, image: &str) -> Result<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let socket = socket.to_path_buf();
    runtime.block_on(async move {
        let channel = Endpoint::from_static("http://cri.sock")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .context("connecting to containerd's CRI socket")?;
        let mut client = ImageServiceClient::new(channel);
        let response = tokio::time::timeout(
            Duration::from_secs(300),
            client.pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                auth: None,
                sandbox_config: None,
            }),
        )
        .await
        .context("CRI PullImage timed out")?
        .with_context(|| format!("CRI PullImage {image}"))?;
        Ok(response.into_inner().image_ref)
    })
}
