//! Talking to containerd the way kubelet does: the CRI image service over
//! containerd's socket (`PullImage` runs the pull inside the containerd
//! daemon; `ListImages` is what kubelet's image GC reads, `pinned` included).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{ImageSpec, ListImagesRequest, PullImageRequest};
use tonic::transport::{Channel, Endpoint, Uri};

/// Runs `f` with a CRI image client on `socket`.
fn with_client<T>(
    socket: &Path,
    f: impl AsyncFnOnce(ImageServiceClient<Channel>) -> Result<T>,
) -> Result<T> {
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
        f(ImageServiceClient::new(channel)).await
    })
}

/// Pulls `image` through containerd's CRI plugin and returns the image
/// reference the runtime reports.
pub fn pull_image(socket: &Path, image: &str) -> Result<String> {
    with_client(socket, async |mut client| {
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

/// An image as the CRI plugin reports it.
#[derive(Debug, Clone)]
pub struct CriImage {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub pinned: bool,
}

/// The CRI `ListImages` answer.
pub fn list_images(socket: &Path) -> Result<Vec<CriImage>> {
    with_client(socket, async |mut client| {
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            client.list_images(ListImagesRequest { filter: None }),
        )
        .await
        .context("CRI ListImages timed out")?
        .context("CRI ListImages")?;
        Ok(response
            .into_inner()
            .images
            .into_iter()
            .map(|i| CriImage {
                id: i.id,
                repo_tags: i.repo_tags,
                pinned: i.pinned,
            })
            .collect())
    })
}
