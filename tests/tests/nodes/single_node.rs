//! One node: peermirror serving its containerd's images to real clients
//! (skopeo, a second containerd), following containerd, and speaking HTTP
//! correctly to hostile clients.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use peermirror_tests::World;
use peermirror_tests::http::{self, read_response};
use peermirror_tests::image::{OCI_INDEX, OCI_MANIFEST, TestImage, layer};
use peermirror_tests::process::{run, wait_for};
use peermirror_tests::services::{
    Containerd, ContainerdOptions, Peermirror, Upstream, require_root,
};
use sha2::{Digest as _, Sha256};

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Checks that every blob in an OCI layout written by a client is
/// byte-identical to the same blob in the source layout, and returns the
/// digests it holds.
fn assert_layout_matches_source(world: &World, out: &std::path::Path) -> Result<BTreeSet<String>> {
    let mut digests = BTreeSet::new();
    for entry in std::fs::read_dir(out.join("blobs/sha256"))? {
        let entry = entry?;
        let bytes = std::fs::read(entry.path())?;
        let digest = format!("sha256:{}", entry.file_name().to_string_lossy());
        ensure!(
            sha256(&bytes) == digest,
            "{digest} in {} has other bytes",
            out.display()
        );
        let source = world.layout.read_blob(&digest)?;
        ensure!(source == bytes, "{digest} differs from the source layout");
        digests.insert(digest);
    }
    Ok(digests)
}

fn write_hosts_toml(dir: &std::path::Path, upstream: &Upstream, mirror: &str) -> Result<()> {
    let host_dir = dir.join(upstream.host());
    std::fs::create_dir_all(&host_dir)?;
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.host()
        ),
    )?;
    Ok(())
}

#[test]
fn real_clients_get_byte_identical_images_even_with_upstream_gone() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut world = World::new()?;
    let pm = Peermirror::start(&world.path("pm"), &world.containerd, &[])?;

    // skopeo, by digest, straight from peermirror.
    for image in &world.images {
        let out = world.path(&format!("skopeo-{}", image.tag));
        run(Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--preserve-digests",
            ])
            .arg(format!(
                "docker://{}/{}@{}",
                pm.registry, image.repo, image.root.digest
            ))
            .arg(format!("oci:{}:copy", out.display())))?;
        let got = assert_layout_matches_source(&world, &out)?;
        // Without --all, skopeo copies the platform it runs on out of an
        // index: every blob of that platform arrives.
        let want: BTreeSet<String> = image
            .default_platform_blobs
            .iter()
            .filter(|b| b.media_type != OCI_INDEX)
            .map(|b| b.digest.clone())
            .collect();
        ensure!(
            want.is_subset(&got),
            "{}: skopeo got {got:?}, wanted {want:?}",
            image.tag
        );
    }

    // A second containerd that lists peermirror as the mirror of the upstream
    // registry, which is stopped first: every byte must come from peermirror.
    world.upstream.stop()?;
    let hosts = world.path("hosts.d");
    write_hosts_toml(&hosts, &world.upstream, &pm.registry.to_string())?;
    let node_b = Containerd::start(
        &world.path("node-b"),
        "default",
        ContainerdOptions::default(),
    )?;
    let file_bytes_before = pm.metric("peermirror_served_bytes_total", &["source=\"file\""])?;
    for image in &world.images {
        node_b
            .pull_via(&hosts, &world.upstream.reference(image))
            .with_context(|| format!("pulling {} through peermirror", image.tag))?;
    }
    let on_b: BTreeSet<String> = node_b.content_digests()?.into_iter().collect();
    let mut layer_bytes = 0;
    for image in &world.images {
        for blob in &image.default_platform_blobs {
            ensure!(
                on_b.contains(&blob.digest),
                "node B lacks {} of {}",
                blob.digest,
                image.tag
            );
            let path = node_b.content_root().join("blobs/sha256").join(blob.hex());
            ensure!(
                std::fs::read(&path)? == world.layout.read_blob(&blob.digest)?,
                "{} differs",
                blob.digest
            );
            if blob.media_type.contains("layer") {
                layer_bytes += blob.size;
            }
        }
    }
    let file_bytes =
        pm.metric("peermirror_served_bytes_total", &["source=\"file\""])? - file_bytes_before;
    ensure!(
        file_bytes >= layer_bytes as f64,
        "peermirror served {file_bytes} bytes from files, the layers alone are {layer_bytes}"
    );
    Ok(())
}

#[test]
fn blobs_are_streamed_through_grpc_when_the_files_cannot_be_read() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    // A regular file where the content directory should be: opening
    // `<it>/blobs/sha256/<hex>` fails with ENOTDIR, even for root.
    let not_a_dir = world.path("not-a-directory");
    std::fs::write(&not_a_dir, b"")?;
    let pm = Peermirror::start(
        &world.path("pm"),
        &world.containerd,
        &["--containerd-content-path", &not_a_dir.to_string_lossy()],
    )?;
    let mut total = 0u64;
    for image in &world.images {
        for blob in &image.default_platform_blobs {
            let r = http::get(
                pm.registry,
                &format!("/v2/{}/blobs/{}", image.repo, blob.digest),
                &[],
            )?;
            ensure!(r.status == 200, "{}: {}", blob.digest, r.status);
            ensure!(
                sha256(&r.body) == blob.digest,
                "{} came back with other bytes",
                blob.digest
            );
            total += blob.size;
        }
        // A range through the gRPC path.
        let big = image.biggest_layer();
        if big.size > 200 {
            let r = http::get(
                pm.registry,
                &format!("/v2/{}/blobs/{}", image.repo, big.digest),
                &[("Range", "bytes=100-199")],
            )?;
            ensure!(r.status == 206);
            ensure!(r.body == world.layout.read_blob(&big.digest)?[100..200]);
        }
    }
    let grpc = pm.metric("peermirror_served_bytes_total", &["source=\"grpc\""])?;
    let file = pm.metric("peermirror_served_bytes_total", &["source=\"file\""])?;
    ensure!(
        grpc >= total as f64,
        "only {grpc} bytes went through gRPC, expected {total}"
    );
    ensure!(
        file == 0.0,
        "{file} bytes were read from files that should be unreachable"
    );

    // And a real client on top.
    let big = world
        .images
        .iter()
        .find(|i| i.tag == "v4")
        .context("big image")?;
    let out = world.path("skopeo-grpc");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--preserve-digests",
        ])
        .arg(format!(
            "docker://{}/{}@{}",
            pm.registry, big.repo, big.root.digest
        ))
        .arg(format!("oci:{}:copy", out.display())))?;
    assert_layout_matches_source(&world, &out)?;
    Ok(())
}

#[test]
fn follows_containerd_through_restarts_new_images_and_removals() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let mut world = World::new()?;
    let resync = Duration::from_secs(2);
    let pm = Peermirror::start(
        &world.path("pm"),
        &world.containerd,
        &["--resync-interval", "2s"],
    )?;
    let pid = pm.proc.pid();

    world.containerd.restart()?;
    let image = world
        .layout
        .add_image("late/arrival", "v9", &[layer(50_000, true)])?;
    world.layout.finish()?;
    world.upstream.push(&world.layout, &image)?;
    world.containerd.pull(&world.upstream.reference(&image))?;
    let ns = world.upstream.host().replace(':', "%3A");
    let target = format!("/v2/{}/manifests/{}?ns={ns}", image.repo, image.tag);
    wait_for(
        "the new image to be served",
        Duration::from_secs(15),
        || {
            http::get(pm.registry, &target, &[])
                .ok()
                .filter(|r| r.status == 200)
        },
    )?;
    ensure!(pm.proc.pid() == pid, "peermirror was restarted");
    // The catalog (what gets advertised) has it too.
    wait_for(
        "the catalog to list the new tag",
        Duration::from_secs(10),
        || {
            let page = http::get(pm.metrics, "/debug", &[]).ok()?;
            String::from_utf8_lossy(&page.body)
                .contains("late/arrival:v9")
                .then_some(())
        },
    )?;

    // Content removed behind our back: a miss at once for requests, and gone
    // from the catalog within the resync interval (containerd 1.6 sends no
    // event for garbage collection).
    let victim = world.images[0].biggest_layer().clone();
    let blob_target = format!("/v2/{}/blobs/{}", world.images[0].repo, victim.digest);
    ensure!(http::get(pm.registry, &blob_target, &[])?.status == 200);
    let blobs_before = pm.metric("peermirror_catalog_blobs", &[])?;
    world.containerd.ctr(&["content", "rm", &victim.digest])?;
    let removed_at = Instant::now();
    let r = http::get(pm.registry, &blob_target, &[])?;
    ensure!(
        r.status == 404 && r.error_code().as_deref() == Some("BLOB_UNKNOWN"),
        "got {}",
        r.status
    );
    pm.wait_metric(
        "the catalog to drop the removed blob",
        "peermirror_catalog_blobs",
        &[],
        resync * 3,
        |blobs| blobs < blobs_before,
    )?;
    ensure!(removed_at.elapsed() <= resync * 3);

    // An image deleted: its tag is a miss.
    world
        .containerd
        .ctr(&["images", "rm", &world.upstream.reference(&image)])?;
    wait_for(
        "the deleted tag to be a miss",
        Duration::from_secs(10),
        || {
            http::get(pm.registry, &target, &[])
                .ok()
                .filter(|r| r.status == 404)
        },
    )?;
    Ok(())
}

/// Content written for an image already known (a layer of another
/// platform of an index, ingested without any image change) creates no image
/// event. From containerd 2.1 on it sends `/content/create`, and the new
/// blob is in the catalog (so advertised) at once; before 2.1 it waits for
/// the resync.
#[test]
fn content_added_to_a_known_image_is_advertised_on_containerd_2_1_events() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let pm = Peermirror::start(
        &world.path("pm"),
        &world.containerd,
        &["--resync-interval", "1h"],
    )?;
    let multi = world
        .images
        .iter()
        .find(|i| i.is_index())
        .context("the multi-platform image")?;
    let arm64_layer = multi
        .blobs
        .iter()
        .find(|b| b.media_type.contains("layer") && !multi.default_platform_blobs.contains(b))
        .context("an arm64 layer")?;
    wait_for("the first catalog", Duration::from_secs(10), || {
        pm.metric("peermirror_catalog_blobs", &[])
            .ok()
            .filter(|b| *b > 0.0)
    })?;
    let before = pm.metric("peermirror_catalog_blobs", &[])?;
    let bytes = world.layout.read_blob(&arm64_layer.digest)?;
    let mut ingest = world
        .containerd
        .ctr_command()
        .args(["--namespace", "k8s.io", "content", "ingest"])
        .args(["--expected-size", &bytes.len().to_string()])
        .args(["--expected-digest", &arm64_layer.digest, "pm-test-arm64"])
        .stdin(Stdio::piped())
        .spawn()?;
    ingest
        .stdin
        .take()
        .context("ctr's stdin")?
        .write_all(&bytes)?;
    ensure!(ingest.wait()?.success(), "ctr content ingest failed");
    let release = peermirror_tests::release::release();
    // Only 2.x fetched the arm64 manifest that makes the layer part of the
    // image; with 2.1 the event makes it count at once.
    if release.at_least(2, 1, 0) {
        wait_for(
            "the arm64 layer in the catalog",
            Duration::from_secs(10),
            || {
                pm.metric("peermirror_catalog_blobs", &[])
                    .ok()
                    .filter(|b| *b == before + 1.0)
            },
        )?;
    } else {
        std::thread::sleep(Duration::from_secs(3));
        let after = pm.metric("peermirror_catalog_blobs", &[])?;
        ensure!(
            after == before,
            "containerd {}: the catalog changed without an event: {before} -> {after}",
            release.version_text
        );
    }
    Ok(())
}

fn find<'a>(world: &'a World, tag: &str) -> &'a TestImage {
    world
        .images
        .iter()
        .find(|i| i.tag == tag)
        .expect("standard image")
}

#[test]
fn speaks_the_distribution_api_and_refuses_hostile_requests() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    let world = World::new()?;
    let mut pm = Peermirror::start(&world.path("pm"), &world.containerd, &[])?;
    let addr = pm.registry;
    let host = world.upstream.host();
    let ns = host.replace(':', "%3A");

    let r = http::get(addr, "/v2/", &[])?;
    ensure!(r.status == 200);
    ensure!(http::request(addr, "HEAD", "/v2/", &[])?.status == 200);

    // Manifests by tag (with ?ns=, percent-encoded or not, or the registry
    // in the path) and by digest, with their own media types.
    let multi = find(&world, "v3");
    for target in [
        format!("/v2/{}/manifests/{}?ns={ns}", multi.repo, multi.tag),
        format!("/v2/{}/manifests/{}?ns={host}", multi.repo, multi.tag),
        format!("/v2/{host}/{}/manifests/{}", multi.repo, multi.tag),
        format!("/v2/{}/manifests/{}", multi.repo, multi.root.digest),
    ] {
        let r = http::get(addr, &target, &[])?;
        ensure!(r.status == 200, "{target}: {}", r.status);
        ensure!(r.header("content-type") == Some(OCI_INDEX), "{target}");
        ensure!(r.header("docker-content-digest") == Some(multi.root.digest.as_str()));
        ensure!(r.content_length() == Some(multi.root.size));
        ensure!(r.body == world.layout.read_blob(&multi.root.digest)?);
    }
    // The digest answered for a tag is itself servable, and so is the
    // platform manifest it leads to.
    let amd64 = multi
        .default_platform_blobs
        .iter()
        .find(|b| b.media_type == OCI_MANIFEST)
        .context("manifest")?;
    let r = http::get(
        addr,
        &format!("/v2/{}/manifests/{}", multi.repo, amd64.digest),
        &[],
    )?;
    ensure!(r.status == 200 && r.header("content-type") == Some(OCI_MANIFEST));
    // The arm64 manifest: containerd 1.x fetched only this platform's, so
    // it is a miss there; 2.x's Transfer service fetches every platform's
    // manifest and config (but only this platform's layers), and what is in
    // the store is served.
    let arm64 = multi
        .blobs
        .iter()
        .find(|b| b.media_type == OCI_MANIFEST && !multi.default_platform_blobs.contains(b))
        .context("arm64 manifest")?;
    let stored = world.containerd.content_digests()?;
    let r = http::get(
        addr,
        &format!("/v2/{}/manifests/{}", multi.repo, arm64.digest),
        &[],
    )?;
    if stored.contains(&arm64.digest) {
        ensure!(r.status == 200 && sha256(&r.body) == arm64.digest);
    } else {
        ensure!(r.status == 404 && r.error_code().as_deref() == Some("MANIFEST_UNKNOWN"));
    }
    ensure!(
        stored.contains(&arm64.digest) == peermirror_tests::release::release().is_v2(),
        "containerd {} fetched the other platform's manifest: {}",
        peermirror_tests::release::release().version_text,
        stored.contains(&arm64.digest)
    );
    // A tag without any registry is a miss; so is a layer asked as manifest.
    let r = http::get(
        addr,
        &format!("/v2/{}/manifests/{}", multi.repo, multi.tag),
        &[],
    )?;
    ensure!(r.status == 404 && r.error_code().as_deref() == Some("MANIFEST_UNKNOWN"));
    let big = find(&world, "v4");
    let layer = big.biggest_layer();
    let r = http::get(
        addr,
        &format!("/v2/{}/manifests/{}", big.repo, layer.digest),
        &[],
    )?;
    ensure!(r.status == 404 && r.error_code().as_deref() == Some("MANIFEST_UNKNOWN"));

    // Docker Hub names normalise the way containerd's do.
    let small = find(&world, "v1");
    world.containerd.ctr(&[
        "images",
        "tag",
        &world.upstream.reference(small),
        "docker.io/library/pmtest:1",
    ])?;
    for target in [
        "/v2/pmtest/manifests/1?ns=docker.io",
        "/v2/library/pmtest/manifests/1?ns=docker.io",
        "/v2/library/pmtest/manifests/1?ns=registry-1.docker.io",
        "/v2/docker.io/library/pmtest/manifests/1",
    ] {
        let r = http::get(addr, target, &[])?;
        ensure!(r.status == 200, "{target}: {}", r.status);
        ensure!(r.header("docker-content-digest") == Some(small.root.digest.as_str()));
    }

    // Blobs: whole, HEAD, and every kind of range.
    let bytes = world.layout.read_blob(&layer.digest)?;
    let size = bytes.len() as u64;
    let path = format!("/v2/{}/blobs/{}", big.repo, layer.digest);
    let r = http::get(addr, &path, &[])?;
    ensure!(r.status == 200 && r.body == bytes);
    ensure!(r.header("accept-ranges") == Some("bytes"));
    ensure!(r.header("docker-content-digest") == Some(layer.digest.as_str()));
    let r = http::request(addr, "HEAD", &path, &[])?;
    ensure!(r.status == 200 && r.content_length() == Some(size) && r.body.is_empty());
    let cases: [(&str, u64, u64); 6] = [
        ("bytes=0-", 0, size - 1),
        ("bytes=0-0", 0, 0),
        ("bytes=1000-1999", 1000, 1999),
        ("bytes=60000000-", 60_000_000, size - 1),
        ("bytes=-4096", size - 4096, size - 1),
        ("bytes=100-999999999999", 100, size - 1),
    ];
    for (range, first, last) in cases {
        let r = http::get(addr, &path, &[("Range", range)])?;
        ensure!(r.status == 206, "{range}: {}", r.status);
        ensure!(
            r.header("content-range") == Some(format!("bytes {first}-{last}/{size}").as_str()),
            "{range}"
        );
        ensure!(
            r.body == bytes[first as usize..=last as usize],
            "{range}: wrong bytes"
        );
    }
    for range in [
        format!("bytes={size}-"),
        "bytes=-0".to_string(),
        format!("bytes={}-{}", size + 5, size + 9),
    ] {
        let r = http::get(addr, &path, &[("Range", &range)])?;
        ensure!(r.status == 416, "{range}: {}", r.status);
        ensure!(r.header("content-range") == Some(format!("bytes */{size}").as_str()));
    }
    for range in ["bytes=9-1", "bytes=abc", "pages=1-2", "bytes=--1"] {
        let r = http::get(addr, &path, &[("Range", range)])?;
        ensure!(
            r.status == 416 && r.error_code().as_deref() == Some("RANGE_INVALID"),
            "{range}: {}",
            r.status
        );
    }
    let r = http::get(addr, &path, &[("Range", "bytes=0-1,5-6")])?;
    ensure!(r.status == 200 && r.body.len() as u64 == size);

    // Misses are fast 404s with the OCI body.
    let unknown = sha256(b"nobody has this");
    let started = Instant::now();
    let r = http::get(addr, &format!("/v2/x/blobs/{unknown}"), &[])?;
    ensure!(r.status == 404 && r.error_code().as_deref() == Some("BLOB_UNKNOWN"));
    ensure!(
        started.elapsed() < Duration::from_millis(500),
        "a miss took {:?}",
        started.elapsed()
    );

    // Hostile and malformed requests: 4xx with an OCI code, never a file
    // outside the content store, never a crash.
    let hex = layer.hex();
    let hostile = [
        format!("/v2/../../../../etc/passwd/blobs/{}", layer.digest),
        format!("/v2/%2e%2e/%2e%2e/blobs/{}", layer.digest),
        format!("/v2/a/blobs/sha256:{hex}/../../../../etc/passwd"),
        "/v2/a/blobs/sha256:..%2F..%2F..%2F..%2Fetc%2Fpasswd".to_string(),
        "/v2/a/blobs/sha256:../../../../../../../../../../../../etc/shadow".to_string(),
        format!("/v2/a/blobs/sha256:{}", hex.to_uppercase()),
        format!("/v2/a/blobs/sha512:{hex}{hex}"),
        "/v2/a/manifests/..%2F..%2Fetc".to_string(),
        "/v2/a/manifests/latest?ns=../../etc".to_string(),
        "/etc/passwd".to_string(),
        "/v2/a/tags/list".to_string(),
        format!("/v2/{}/blobs/{}", "a/".repeat(3000), layer.digest),
    ];
    for target in &hostile {
        let r = http::get(addr, target, &[])?;
        ensure!((400..500).contains(&r.status), "{target}: {}", r.status);
        ensure!(r.error_code().is_some(), "{target}: no OCI error code");
        ensure!(
            !r.body.windows(5).any(|w| w == b"root:"),
            "{target} leaked a system file"
        );
    }
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        let r = http::request(addr, method, &path, &[])?;
        ensure!(
            r.status == 405 && r.header("allow") == Some("GET, HEAD"),
            "{method}: {}",
            r.status
        );
        ensure!(r.error_code().as_deref() == Some("UNSUPPORTED"));
    }
    let garbage: [&[u8]; 4] = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 tls hello\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /v2/\xff\xfe HTTP/1.1\r\n\r\n",
    ];
    for raw in garbage {
        let r = http::raw(addr, raw, false)?;
        ensure!(
            (400..500).contains(&r.status),
            "{:?}: {}",
            String::from_utf8_lossy(raw),
            r.status
        );
    }
    let huge = format!("GET /v2/ HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    ensure!(http::raw(addr, huge.as_bytes(), false)?.status == 431);
    let r = http::raw(
        addr,
        b"PUT /v2/a/blobs/uploads/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
        false,
    )?;
    ensure!(r.status == 405);

    // Keep-alive, pipelining, HTTP/1.0.
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buffer = Vec::new();
    let req = format!(
        "GET {path} HTTP/1.1\r\nRange: bytes=0-9\r\n\r\nHEAD {path} HTTP/1.1\r\n\r\nGET /v2/ HTTP/1.1\r\n\r\n"
    );
    conn.write_all(req.as_bytes())?;
    let a = read_response(&mut conn, false, &mut buffer)?;
    let b = read_response(&mut conn, true, &mut buffer)?;
    let c = read_response(&mut conn, false, &mut buffer)?;
    ensure!(a.status == 206 && a.body == bytes[..10]);
    ensure!(b.status == 200 && b.content_length() == Some(size));
    ensure!(c.status == 200 && c.body == b"{}");
    let r = http::raw(addr, b"GET /v2/ HTTP/1.0\r\n\r\n", false)?;
    ensure!(r.status == 200 && r.header("connection") == Some("close"));

    // Content still being written (containerd's ingest/) is never served.
    let pending = vec![7u8; 1 << 20];
    let pending_digest = sha256(&pending);
    let mut ingest = world
        .containerd
        .ctr_command()
        .args([
            "--namespace",
            "k8s.io",
            "content",
            "ingest",
            "--expected-size",
            &pending.len().to_string(),
        ])
        .args(["--expected-digest", &pending_digest, "pm-test-ingest"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdin = ingest.stdin.take().context("stdin")?;
    stdin.write_all(&pending[..pending.len() / 2])?;
    stdin.flush()?;
    let ingest_dir = world.containerd.content_root().join("ingest");
    let seen = wait_for("the ingest to appear", Duration::from_secs(10), || {
        let n = std::fs::read_dir(&ingest_dir).ok()?.count();
        (n > 0).then_some(n)
    });
    let r = http::get(addr, &format!("/v2/x/blobs/{pending_digest}"), &[]);
    let _ = ingest.kill();
    let _ = ingest.wait();
    seen?;
    let r = r?;
    ensure!(
        r.status == 404 && r.error_code().as_deref() == Some("BLOB_UNKNOWN"),
        "in-progress ingest answered {}",
        r.status
    );

    // SIGTERM while a big body is in flight: the response completes, then
    // the daemon exits 0.
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    conn.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())?;
    let mut first = [0u8; 65536];
    let n = std::io::Read::read(&mut conn, &mut first)?;
    ensure!(n > 0);
    pm.proc.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let mut received = first[..n].to_vec();
    std::io::Read::read_to_end(&mut conn, &mut received)?;
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no head")?
        + 4;
    ensure!(
        received[head_end..] == bytes[..],
        "in-flight body cut by shutdown ({} bytes)",
        received.len() - head_end
    );
    let (status, _) = pm.proc.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "exit status {status}");
    Ok(())
}

#[test]
fn status_endpoints_logs_reconnection_and_clean_exit() -> Result<()> {
    let _turn = peermirror_tests::turn::take(module_path!());
    require_root();
    let dir = tempfile::Builder::new().prefix("pm-test-").tempdir()?;
    let mut containerd = Containerd::start(
        &dir.path().join("node"),
        "k8s.io",
        ContainerdOptions::default(),
    )?;
    containerd.stop()?;

    // Started while containerd is down: alive, not ready, and says why.
    let mut pm = Peermirror::spawn(
        &dir.path().join("pm"),
        &containerd,
        &["--log-format", "json"],
    )?;
    let r = wait_for("the status port", Duration::from_secs(10), || {
        http::get(pm.metrics, "/readyz", &[]).ok()
    })?;
    ensure!(r.status == 503, "ready without containerd");
    ensure!(
        String::from_utf8_lossy(&r.body).contains("containerd"),
        "readyz does not say why"
    );
    ensure!(http::get(pm.metrics, "/healthz", &[])?.status == 200);
    // Misses are answered even so (containerd falls back to upstream).
    let r = http::get(pm.registry, &format!("/v2/x/blobs/{}", sha256(b"x")), &[])?;
    ensure!(r.status == 404);

    // containerd comes up: the daemon connects by itself.
    containerd = Containerd::start(
        &dir.path().join("node"),
        "k8s.io",
        ContainerdOptions::default(),
    )?;
    pm.wait_ready(Duration::from_secs(20))?;
    ensure!(pm.proc.alive());
    pm.wait_metric(
        "the containerd_connected gauge",
        "peermirror_containerd_connected",
        &[],
        Duration::from_secs(2),
        |connected| connected == 1.0,
    )?;
    let metrics =
        String::from_utf8_lossy(&http::get(pm.metrics, "/metrics", &[])?.body).into_owned();
    for name in [
        "peermirror_http_request_duration_seconds",
        "peermirror_served_bytes_total",
        "peermirror_serving_path",
        "peermirror_catalog_tags",
    ] {
        ensure!(metrics.contains(name), "/metrics lacks {name}");
    }

    // SIGTERM: drain and exit 0, promptly.
    let (status, took) = pm.proc.terminate(Duration::from_secs(15))?;
    ensure!(status.success(), "exit status {status}");
    ensure!(took < Duration::from_secs(5), "took {took:?} to stop");
    // Every log line is JSON.
    let log = std::fs::read_to_string(&pm.proc.log)?;
    ensure!(log.lines().count() > 3);
    for line in log.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .with_context(|| format!("not JSON: {line}"))?;
    }
    drop(containerd);

    // Bad configuration: a clear error and a non-zero exit, no panic.
    let bin = peermirror_tests::services::peermirror_bin();
    for (args, expect) in [
        (vec!["run", "--registry-addr", "nonsense"], "registry-addr"),
        (vec!["run", "--resync-interval", "soon"], "resync-interval"),
        (
            vec!["run", "--log-level", "info,[[", "--insecure-open-network"],
            "log-level",
        ),
        (vec!["run"], "preshared key"),
        (
            vec![
                "run",
                "--psk-file",
                "/nonexistent/swarm.key",
                "--metrics-addr",
                "127.0.0.1:0",
                "--registry-addr",
                "127.0.0.1:0",
                "--router-addr",
                "127.0.0.1:0",
            ],
            "/nonexistent/swarm.key",
        ),
    ] {
        let out = Command::new(&bin).args(&args).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "{args:?} succeeded");
        ensure!(stderr.contains(expect), "{args:?}: {stderr}");
        ensure!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy_addr = busy.local_addr()?.to_string();
    let out = Command::new(&bin)
        .args([
            "run",
            "--registry-addr",
            &busy_addr,
            "--metrics-addr",
            "127.0.0.1:0",
            "--insecure-open-network",
            "--router-addr",
            "127.0.0.1:0",
            // The machine-wide default dataplane is not this test's.
            "--dataplane",
            "off",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("d2"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("cannot listen"),
        "{stderr}"
    );
    Ok(())
}
