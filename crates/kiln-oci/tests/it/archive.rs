//! docker-archive interop: podman loads and skopeo inspects what kiln writes; kiln reads what
//! skopeo writes.

use kiln_oci::archive::{
    DockerArchive, DockerArchiveWriter, OciArchive, write_docker_archive, write_oci_archive,
};
use kiln_oci::{Image, ManifestFormat, OciLayout, Platform, PlatformMatcher, media_type};

use crate::fixture::{busybox_image, podman, run, run_json, skopeo};

const TAG: &str = "example.test/kiln/busybox:v1";

#[test]
fn podman_loads_a_kiln_docker_archive() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Docker);
    let archive = dir.path().join("image.tar");
    write_docker_archive(&archive, &image, &[TAG]).unwrap();

    let out = run(podman(dir.path()).arg("load").arg("-i").arg(&archive));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(TAG), "podman load output: {stdout}");
    let info = run_json(podman(dir.path()).args(["image", "inspect", TAG]));
    let info = &info[0];
    // podman's image ID is the config digest
    assert_eq!(info["Id"], image.manifest().config.digest.hex(), "{info}");
    assert_eq!(info["Architecture"], Platform::host().architecture);
    assert_eq!(info["Config"]["Cmd"], serde_json::json!(["/bin/sh"]));
    let diff_ids: Vec<String> =
        image.config().unwrap().rootfs.diff_ids.iter().map(ToString::to_string).collect();
    assert_eq!(info["RootFS"]["Layers"], serde_json::json!(diff_ids));

    // and the loaded image runs: both layers are there, busybox works
    let out = run(podman(dir.path()).args([
        "run",
        "--rm",
        "--no-healthcheck",
        "--runtime",
        "runc",
        "--network",
        "none",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        TAG,
        "/bin/cat",
        "/etc/motd",
    ]));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "built by kiln-oci tests\n");
}

#[test]
fn skopeo_inspects_a_kiln_docker_archive() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Oci);
    let archive = dir.path().join("image.tar");
    let mut w = DockerArchiveWriter::create(&archive).unwrap();
    w.add_image(&image, &[TAG, "kiln-busybox"]).unwrap();
    w.finish().unwrap();

    let target = format!("docker-archive:{}", archive.display());
    let info = run_json(skopeo().args(["inspect", &target]));
    assert_eq!(info["Architecture"], Platform::host().architecture, "{info}");
    assert_eq!(info["Labels"]["org.example.test"], "kiln");
    assert_eq!(info["Layers"].as_array().map(Vec::len), Some(2), "{info}");
    let config = run(skopeo().args(["inspect", "--config", "--raw", &target]));
    assert_eq!(config.stdout, image.raw_config(), "the config is stored byte for byte");
}

#[test]
fn kiln_reads_a_docker_archive_written_by_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Oci);
    let layout = dir.path().join("layout");
    OciLayout::create(&layout).unwrap().write_image(&image, Some("v1")).unwrap();
    let archive = dir.path().join("skopeo.tar");
    run(skopeo().args([
        "copy",
        "--quiet",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker-archive:{}:{TAG}", archive.display()),
    ]));

    let read = DockerArchive::open(&archive).unwrap().image(Some(TAG)).unwrap();
    kiln_oci::validate::image(&read).unwrap();
    assert_eq!(read.repo_tags(), [TAG]);
    let config = read.config().unwrap();
    assert_eq!(config.rootfs.diff_ids, image.config().unwrap().rootfs.diff_ids);
    assert!(
        read.manifest()
            .layers
            .iter()
            .all(|l| media_type::layer_compression(&l.media_type).is_some())
    );
    // Copy into a layout (verifying every layer as it streams) and unpack-free check: the
    // layout image has the same config and the same layer content (diff_ids).
    let back = OciLayout::create(dir.path().join("back")).unwrap();
    back.write_image(&read, Some("v1")).unwrap();
    let again = back.image(Some("v1"), &PlatformMatcher::only(&Platform::host())).unwrap();
    assert_eq!(again.config().unwrap().rootfs.diff_ids, config.rootfs.diff_ids);
}

#[test]
fn kiln_archive_round_trips_through_kiln() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Docker);
    let archive = dir.path().join("image.tar");
    write_docker_archive(&archive, &image, &[TAG]).unwrap();
    let read = DockerArchive::open(&archive).unwrap().image(None).unwrap();
    kiln_oci::validate::image(&read).unwrap();
    // Same config, same blobs and media types: the synthesised Docker manifest equals the
    // original one, so the image digest survives the trip.
    assert_eq!(read.raw_config(), image.raw_config());
    assert_eq!(read.manifest(), image.manifest());
    assert_eq!(read.digest(), image.digest());
}

#[test]
fn skopeo_reads_a_kiln_oci_archive_and_kiln_reads_skopeos() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Oci);
    let archive = dir.path().join("oci.tar");
    write_oci_archive(&archive, &image, Some("v1")).unwrap();
    let target = format!("oci-archive:{}:v1", archive.display());
    let info = run_json(skopeo().args(["inspect", &target]));
    assert_eq!(info["Digest"], image.digest().to_string(), "{info}");

    // skopeo writes one from a kiln layout; kiln reads and validates it
    let layout = dir.path().join("layout");
    OciLayout::create(&layout).unwrap().write_image(&image, Some("v1")).unwrap();
    let theirs = dir.path().join("skopeo-oci.tar");
    run(skopeo().args([
        "copy",
        "--quiet",
        &format!("oci:{}:v1", layout.display()),
        &format!("oci-archive:{}:copied", theirs.display()),
    ]));
    let read = OciArchive::open(&theirs)
        .unwrap()
        .image(Some("copied"), &PlatformMatcher::only(&Platform::host()))
        .unwrap();
    kiln_oci::validate::image(&read).unwrap();
    assert_eq!(read.raw_config(), image.raw_config());
}
