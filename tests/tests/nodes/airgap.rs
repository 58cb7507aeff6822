//! Air-gapped images as K3s users have them: archives (`docker save` and
//! OCI, zstd- and gzip-compressed) imported on one node only, pinned, and
//! pulled by the other nodes through CRI `PullImage` while the upstream,
//! which never had them, is stopped. Broken archives leave nothing behind.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use peermirror_tests::cluster::{Cluster, ClusterNode, NodeSpec};
use peermirror_tests::image::{TestImage, layer};
use peermirror_tests::process::{run, wait_for};
use peermirror_tests::release::release;
use peermirror_tests::services::peermirror_bin;

const KEY: [u8; 32] = [0x44; 32];

/// An air-gapped node: a tag one node imported is answered from that node
/// alone (`--tag-resolution single-holder`).
fn spec(name: &str, extra: &[String]) -> NodeSpec {
    let wait = [
        "--mirror-resolve-timeout",
        "2s",
        "--tag-resolution",
        "single-holder",
    ]
    .map(String::from);
    NodeSpec {
        name: name.to_string(),
        psk: KEY,
        extra: wait.into_iter().chain(extra.iter().cloned()).collect(),
    }
}

/// `peermirror import` against a node's containerd.
fn import(node: &ClusterNode, archive: &Path) -> std::process::Output {
    Command::new(peermirror_bin())
        .arg("import")
        .arg("--containerd-sock")
        .arg(&node.containerd.socket)
        .args(["--containerd-namespace", "k8s.io"])
        .arg(archive)
        .output()
        .expect("running peermirror import")
}

/// skopeo writes the archive of `image` from the test layout, named `name`.
fn skopeo_archive(
    cluster: &Cluster,
    image: &TestImage,
    transport: &str,
    file: &Path,
    name: &str,
) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet"]);
    if transport == "oci-archive" {
        // The archive then holds the layout's own manifest, byte for byte.
        cmd.arg("--preserve-digests");
    }
    run(cmd.args([
        &format!("oci:{}:{}", cluster.layout.dir.display(), image.tag),
        &format!("{transport}:{}:{name}", file.display()),
    ]))
    .map(drop)
}

/// `import`, killed (by its PID) if it has not ended within `limit`.
fn import_within(
    node: &ClusterNode,
    archive: &Path,
    limit: Duration,
) -> Result<std::process::Output> {
    let child = Command::new(peermirror_bin())
        .arg("import")
        .arg("--containerd-sock")
        .arg(&node.containerd.socket)
        .args(["--containerd-namespace", "k8s.io"])
        .arg(archive)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            // SAFETY: kill(2) on the PID of the import this test started.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
            anyhow::bail!("the import of {} ran for over {limit:?}", archive.display())
        }
    }
}

/// The OCI archive `oci_tar` rewritten so that its index.json names an index
/// of `fan` entries that all name one index of `fan` entries, and so on,
/// `levels` deep, the last naming the image's manifest: `fan`^`levels`
/// references, a few MiB on disk (each index under the 4 MiB a manifest
/// may have).
fn fanned_archive(oci_tar: &Path, fan: usize, levels: usize, out: &Path) -> Result<()> {
    use sha2::Digest as _;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut a = tar::Archive::new(std::fs::File::open(oci_tar)?);
    for entry in a.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().into_owned();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut data)?;
        files.push((path, data));
    }
    let index_at = files
        .iter()
        .position(|(p, _)| p.trim_start_matches("./") == "index.json")
        .context("the OCI archive has no index.json")?;
    let index: serde_json::Value = serde_json::from_slice(&files[index_at].1)?;
    let top = index["manifests"][0].clone();
    let mut manifest = top.clone();
    manifest
        .as_object_mut()
        .context("a descriptor")?
        .remove("annotations");
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    let mut blob = |entries: serde_json::Value| -> Result<serde_json::Value> {
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": INDEX,
            "manifests": entries,
        }))?;
        let hex = hex::encode(sha2::Sha256::digest(&bytes));
        let descriptor = serde_json::json!({
            "mediaType": INDEX,
            "digest": format!("sha256:{hex}"),
            "size": bytes.len(),
        });
        files.push((format!("blobs/sha256/{hex}"), bytes));
        Ok(descriptor)
    };
    let mut outer = manifest;
    for _ in 0..levels {
        outer = blob(serde_json::Value::Array(vec![outer; fan]))?;
    }
    outer["annotations"] = top["annotations"].clone();
    files[index_at].1 = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [outer],
    }))?;
    let mut b = tar::Builder::new(std::fs::File::create(out)?);
    for (path, data) in &files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, path, data.as_slice())?;
    }
    b.finish()?;
    Ok(())
}

fn image_names(node: &ClusterNode) -> Result<Vec<String>> {
    Ok(node
        .containerd
        .ctr(&["images", "ls", "--quiet"])?
        .lines()
        .map(str::to_string)
        .collect())
}

#[test]
fn imported_archives_are_pinned_and_pulled_by_peers_without_the_upstream() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut cluster = Cluster::start(&[spec("a", &[]), spec("b", &[]), spec("c", &[])])?;
    let (oci, docker) = {
        let l = &mut cluster.layout;
        let oci = l.add_image(
            "airgap/oci",
            "v1",
            &[layer(6 << 20, false), layer(40_000, true)],
        )?;
        let docker = l.add_image("airgap/docker", "v2", &[layer(3 << 20, true)])?;
        l.finish()?;
        (oci, docker)
    };
    let host = cluster.upstream.host();
    let oci_ref = format!("{host}/{}:{}", oci.repo, oci.tag);
    let docker_ref = format!("{host}/{}:{}", docker.repo, docker.tag);
    let work = cluster.dir.path().join("archives");
    std::fs::create_dir_all(&work)?;

    // An OCI archive, zstd-compressed as K3s ships its airgap images.
    let oci_tar = work.join("oci.tar");
    skopeo_archive(&cluster, &oci, "oci-archive", &oci_tar, &oci_ref)?;
    let oci_zst = work.join("oci.tar.zst");
    std::fs::write(
        &oci_zst,
        zstd::encode_all(std::fs::read(&oci_tar)?.as_slice(), 3)?,
    )?;
    // A classic `docker save` archive, gzip-compressed.
    let docker_tar = work.join("docker.tar");
    skopeo_archive(
        &cluster,
        &docker,
        "docker-archive",
        &docker_tar,
        &docker_ref,
    )?;
    let docker_gz = work.join("docker.tar.gz");
    {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &std::fs::read(&docker_tar)?)?;
        std::fs::write(&docker_gz, gz.finish()?)?;
    }

    // Broken archives on A first: refused, clearly, and nothing remains.
    let a = cluster.node("a");
    let images_before = image_names(a)?;
    let content_before = a.content()?;
    let bytes = std::fs::read(&oci_zst)?;
    let truncated = work.join("truncated.tar.zst");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2])?;
    let foreign = work.join("foreign.tar");
    {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        let data = vec![9u8; 2 << 20];
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "etc/some-file", data.as_slice())?;
        std::fs::write(&foreign, b.into_inner()?)?;
    }
    // 25,000³ references to one manifest: each index is checked once, and
    // the references are counted (3 × 25,000 is over the bound).
    let fanned = work.join("fanned.tar");
    fanned_archive(&oci_tar, 25_000, 3, &fanned)?;
    for (archive, wanted) in [
        (&truncated, "cannot be read as an image archive"),
        (&foreign, "is not an image archive"),
        (&fanned, "reference more than 65536 descriptors"),
    ] {
        let out = import_within(a, archive, Duration::from_secs(120))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{} was imported", archive.display());
        ensure!(
            stderr.contains(wanted) && stderr.contains(&archive.display().to_string()),
            "import of {}: {stderr}",
            archive.display()
        );
        ensure!(!stderr.contains("panicked"), "{stderr}");
    }
    ensure!(
        image_names(a)? == images_before,
        "a failed import left an image record"
    );
    let content_after = a.content()?;
    ensure!(
        content_after == content_before,
        "a failed import left content: {:?}",
        content_after
            .iter()
            .filter(|d| !content_before.contains(d))
            .collect::<Vec<_>>()
    );
    let ingests = a.containerd.ctr(&["content", "active"])?;
    ensure!(
        ingests.lines().count() <= 1,
        "unfinished writes left: {ingests}"
    );

    // The OCI archive through `peermirror import`.
    let out = import(a, &oci_zst);
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "peermirror import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        stdout.contains(&format!("imported {oci_ref} {}", oci.root.digest)),
        "{stdout}"
    );
    // The docker archive through A's `--import-dir`, dropped in while it runs.
    let import_dir = a.dir.join("images");
    std::fs::create_dir_all(&import_dir)?;
    {
        let a = cluster.node_mut("a");
        a.restart_peermirror(&["--import-dir", &import_dir.to_string_lossy()])?;
    }
    cluster.wait_ready(&["a"], Duration::from_secs(60))?;
    std::fs::copy(&docker_gz, import_dir.join("docker.tar.gz.part"))?;
    std::fs::rename(
        import_dir.join("docker.tar.gz.part"),
        import_dir.join("docker.tar.gz"),
    )?;
    let a = cluster.node("a");
    wait_for(
        "A to import the dropped archive",
        Duration::from_secs(30),
        || image_names(a).ok().filter(|n| n.contains(&docker_ref)),
    )?;
    // Pinned, as the CRI plugin reports it (and as kubelet's GC reads it).
    let labels = a.containerd.ctr(&["images", "ls"])?;
    for name in [&oci_ref, &docker_ref] {
        let line = labels
            .lines()
            .find(|l| l.starts_with(name.as_str()))
            .with_context(|| format!("{name} in ctr images ls"))?;
        ensure!(line.contains("io.cri-containerd.pinned=pinned"), "{line}");
    }
    let cri = peermirror_tests::cri::list_images(&a.containerd.socket)?;
    let reports_pinned = release().at_least(1, 7, 3)
        || (release().version.0 == 1 && release().version.1 == 6 && release().at_least(1, 6, 22));
    for name in [&oci_ref, &docker_ref] {
        let image = cri
            .iter()
            .find(|i| i.repo_tags.contains(name))
            .with_context(|| format!("{name} in CRI ListImages: {cri:?}"))?;
        ensure!(
            image.pinned == reports_pinned,
            "CRI on containerd {} reports {name} pinned={}",
            release().version_text,
            image.pinned
        );
    }
    a.pm().wait_metric(
        "A to advertise the imported images",
        "peermirror_advertised_keys",
        &[],
        Duration::from_secs(30),
        |keys| keys >= 8.0,
    )?;

    // The upstream never had them, and is gone too: B and C pull through
    // their peers, as kubelet does.
    cluster.upstream.stop()?;
    let a = cluster.node("a");
    for name in ["b", "c"] {
        let node = cluster.node(name);
        // A restarted for --import-dir: wait until this node's peermirror
        // finds A's records for both tags before containerd asks it.
        let ns = host.replace(':', "%3A");
        for image in [&oci, &docker] {
            let path = format!("/v2/{}/manifests/{}?ns={ns}", image.repo, image.tag);
            wait_for(
                &format!("{name} to find {} through its peers", image.repo),
                Duration::from_secs(30),
                || {
                    let pm = node.pm();
                    pm.via
                        .get(pm.registry, &path, &[])
                        .ok()
                        .filter(|r| r.status == 200)
                },
            )?;
        }
        for (reference, image) in [(&oci_ref, &oci), (&docker_ref, &docker)] {
            node.cri_pull(reference)
                .with_context(|| format!("{name}: CRI pull {reference}"))?;
            if image.repo == oci.repo {
                node.assert_has(&cluster.layout, image)?;
            } else {
                // skopeo's docker archive stores the layer uncompressed, so
                // the pulled digests are the archive's: check the image
                // resolves to what A holds.
                let on_a = a.containerd.ctr(&["images", "ls"])?;
                let on_node = node.containerd.ctr(&["images", "ls"])?;
                let digest_of = |text: &str| {
                    text.lines()
                        .find(|l| l.starts_with(reference.as_str()))
                        .and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
                };
                ensure!(
                    digest_of(&on_a).is_some() && digest_of(&on_a) == digest_of(&on_node),
                    "{name} holds another {reference}"
                );
            }
        }
    }
    Ok(())
}
