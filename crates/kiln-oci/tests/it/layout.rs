//! OCI layout interop: skopeo and umoci read what kiln writes; kiln reads what skopeo writes.

use std::fs;
use std::process::Command;

use kiln_oci::archive::write_docker_archive;
use kiln_oci::{
    Image, ImageConfig, ManifestFormat, OciLayout, Platform, PlatformMatcher, media_type,
};

use crate::fixture::{APPLETS, busybox_image, busybox_image_for, is_root, run, run_json, skopeo};

fn host() -> PlatformMatcher {
    PlatformMatcher::only(&Platform::host())
}

#[test]
fn skopeo_inspects_a_kiln_layout_with_several_images() {
    let dir = tempfile::tempdir().unwrap();
    let oci = busybox_image(dir.path(), ManifestFormat::Oci);
    let docker_dir = dir.path().join("docker");
    fs::create_dir(&docker_dir).unwrap();
    let docker = busybox_image(&docker_dir, ManifestFormat::Docker);
    let root = dir.path().join("layout");
    let layout = OciLayout::create(&root).unwrap();
    layout.write_image(&oci, Some("oci")).unwrap();
    // skopeo and umoci only see OCI entries in index.json: convert like `skopeo copy` does
    let docker = kiln_oci::convert(docker, ManifestFormat::Oci);
    layout.write_image(&docker, Some("docker")).unwrap();

    let images: [(&str, &dyn Image); 2] = [("oci", &oci), ("docker", &docker)];
    for (tag, image) in images {
        let info = run_json(skopeo().args(["inspect", &format!("oci:{}:{tag}", root.display())]));
        assert_eq!(info["Digest"], image.digest().to_string(), "{tag}: {info}");
        assert_eq!(info["Architecture"], Platform::host().architecture);
        assert_eq!(info["Os"], "linux");
        let layers: Vec<String> =
            image.manifest().layers.iter().map(|l| l.digest.to_string()).collect();
        assert_eq!(info["Layers"], serde_json::json!(layers), "{tag}");
        assert_eq!(info["Labels"]["org.example.test"], "kiln");

        let raw =
            run(skopeo().args(["inspect", "--raw", &format!("oci:{}:{tag}", root.display())]));
        assert_eq!(raw.stdout, image.raw_manifest(), "skopeo sees kiln's exact manifest bytes");
        let config = run(skopeo().args([
            "inspect",
            "--config",
            "--raw",
            &format!("oci:{}:{tag}", root.display()),
        ]));
        let config = ImageConfig::from_slice(&config.stdout).unwrap();
        let hc = config.config.as_ref().unwrap().healthcheck.as_ref().unwrap();
        assert_eq!(hc.test, ["CMD", "/bin/true"], "Docker-only fields survive in the layout");
    }
}

#[test]
fn umoci_unpacks_a_kiln_layout() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Oci);
    let report = kiln_oci::validate::image(&image).unwrap();
    assert_eq!(report.layers_checked, 2);
    let root = dir.path().join("layout");
    OciLayout::create(&root).unwrap().write_image(&image, Some("latest")).unwrap();

    let bundle = dir.path().join("bundle");
    let mut cmd = Command::new("umoci");
    cmd.arg("unpack");
    if !is_root() {
        cmd.arg("--rootless");
    }
    run(cmd.arg("--image").arg(format!("{}:latest", root.display())).arg(&bundle));

    let rootfs = bundle.join("rootfs");
    let busybox = fs::read(rootfs.join("bin/busybox")).unwrap();
    assert_eq!(busybox, fs::read(crate::fixture::BUSYBOX).unwrap());
    for applet in APPLETS {
        let link = fs::read_link(rootfs.join("bin").join(applet)).unwrap();
        assert_eq!(link.to_str(), Some("busybox"));
    }
    assert_eq!(fs::read_to_string(rootfs.join("etc/motd")).unwrap(), "built by kiln-oci tests\n");
    let runtime: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert_eq!(runtime["process"]["args"], serde_json::json!(["/bin/sh"]));
    assert_eq!(runtime["process"]["env"][0], "PATH=/bin");
}

#[test]
fn skopeo_copies_a_kiln_layout_and_kiln_reads_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Oci);
    let src = dir.path().join("src");
    OciLayout::create(&src).unwrap().write_image(&image, Some("v1")).unwrap();
    let dst = dir.path().join("dst");
    run(skopeo().args([
        "copy",
        "--quiet",
        &format!("oci:{}:v1", src.display()),
        &format!("oci:{}:copied", dst.display()),
    ]));

    let layout = OciLayout::open(&dst).unwrap();
    assert_eq!(layout.tags().unwrap(), ["copied"]);
    let copy = layout.image(Some("copied"), &host()).unwrap();
    kiln_oci::validate::image(&copy).unwrap();
    assert_eq!(copy.raw_config(), image.raw_config());
    // skopeo keeps the gzip layer and compresses the uncompressed one
    assert_eq!(copy.manifest().layers[0], image.manifest().layers[0]);
    assert_eq!(copy.manifest().layers[1].media_type, media_type::OCI_LAYER_GZIP);
    // kiln copies the skopeo-written layout back into its own, verifying every blob
    let again = OciLayout::create(dir.path().join("again")).unwrap();
    let d = again.write_image(&copy, Some("back")).unwrap();
    assert_eq!(d.digest, copy.digest());
}

#[test]
fn kiln_reads_a_layout_skopeo_converted_from_a_docker_archive() {
    let dir = tempfile::tempdir().unwrap();
    let image = busybox_image(dir.path(), ManifestFormat::Docker);
    let archive = dir.path().join("image.tar");
    write_docker_archive(&archive, &image, &["example.test/kiln/busybox:v1"]).unwrap();
    let root = dir.path().join("layout");
    run(skopeo().args([
        "copy",
        "--quiet",
        &format!("docker-archive:{}", archive.display()),
        &format!("oci:{}:converted", root.display()),
    ]));

    let layout = OciLayout::open(&root).unwrap();
    let read = layout.image(Some("converted"), &host()).unwrap();
    kiln_oci::validate::image(&read).unwrap();
    assert_eq!(read.manifest().media_type(), media_type::OCI_MANIFEST);
    let config = read.config().unwrap();
    assert_eq!(config.rootfs.diff_ids, image.config().unwrap().rootfs.diff_ids);
    assert_eq!(config.platform(), Platform::host());
    assert_eq!(config.config.as_ref().unwrap().cmd.as_deref(), Some(&["/bin/sh".to_owned()][..]));
    let copy = OciLayout::create(dir.path().join("copy")).unwrap();
    copy.write_image(&read, Some("x")).unwrap();
    for layer in &read.manifest().layers {
        assert!(copy.has_blob(&layer.digest));
    }
}

#[test]
fn skopeo_resolves_a_kiln_multi_platform_index() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("layout");
    let layout = OciLayout::create(&root).unwrap();
    let mut index = kiln_oci::ImageIndex::new_oci();
    let mut children = Vec::new();
    for platform in ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"] {
        let sub = dir.path().join(platform.replace('/', "-"));
        fs::create_dir(&sub).unwrap();
        let platform: Platform = platform.parse().unwrap();
        let image = busybox_image_for(&sub, ManifestFormat::Oci, &platform);
        let d = layout.write_image_blobs(&image).unwrap();
        index.manifests.push(d.with_platform(platform.clone()));
        children.push((platform, image.digest(), image.manifest().config.digest.clone()));
    }
    let d = layout.write_index(&index).unwrap();
    layout.set_tag(&d, "multi").unwrap();
    let target = format!("oci:{}:multi", root.display());

    let raw = run(skopeo().args(["inspect", "--raw", &target]));
    assert_eq!(raw.stdout, index.to_json());
    for (platform, digest, _) in &children {
        let mut cmd = skopeo();
        cmd.args(["--override-os", &platform.os, "--override-arch", &platform.architecture]);
        if let Some(v) = &platform.variant {
            cmd.args(["--override-variant", v]);
        }
        let info = run_json(cmd.args(["inspect", &target]));
        assert_eq!(info["Architecture"], platform.architecture, "{platform}: {info}");
        // kiln picks the same child skopeo does
        let ours = layout.image(Some("multi"), &PlatformMatcher::only(platform)).unwrap();
        assert_eq!(ours.digest(), *digest, "{platform}");
    }

    // skopeo copies the whole index (compressing the uncompressed layer, so manifests change);
    // kiln reads every platform back from the copy
    let dst = dir.path().join("copy");
    run(skopeo().args([
        "copy",
        "--quiet",
        "--all",
        &target,
        &format!("oci:{}:multi", dst.display()),
    ]));
    let copy = OciLayout::open(&dst).unwrap();
    for (platform, _, config) in &children {
        let image = copy.image(Some("multi"), &PlatformMatcher::only(platform)).unwrap();
        kiln_oci::validate::image(&image).unwrap();
        assert_eq!(image.manifest().config.digest, *config, "{platform}");
        assert!(image.config().unwrap().platform().same_as(platform));
    }
}
