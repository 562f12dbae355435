//! Early uploads (`registry_source::EarlyUploads`) against the real distribution registry: a
//! layer written while its upload session is already open goes up in that session; one the
//! step never wrote gives its session back; and the final push's question "is this layer
//! there?" waits for an upload still under way instead of sending the layer again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_build::engine::LayerSink as _;
use kiln_build::registry_source::EarlyUploads;
use kiln_fs::writer::{Compression, GrowingBlob, LayerEntry, WriteOptions, write_layer};
use kiln_oci::Digest;
use kiln_reference::Reference;
use kiln_registry::{Credentials, RegistryClient, RegistryOptions};
use kiln_testutil::Registry;

fn client(reg: &Registry) -> RegistryClient {
    let options =
        RegistryOptions { insecure: vec![reg.host.clone()], ..RegistryOptions::default() };
    RegistryClient::new(options, Credentials::anonymous()).unwrap()
}

/// Upload sessions the registry holds open for `repo`: those with a `startedat` file (a
/// cancelled one may leave its hash state behind, but not that).
fn open_sessions(reg: &Registry, repo: &str) -> Vec<String> {
    let dir = reg.storage().join("docker/registry/v2/repositories").join(repo).join("_uploads");
    fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter(|e| e.path().join("startedat").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A small layer of `root` (one file), written with `watch` as a build step writes it.
fn write_watched(root: &Path, blobs: &Path, watch: &Arc<GrowingBlob>) -> (Digest, u64) {
    fs::create_dir_all(root).unwrap();
    fs::write(root.join("hello.txt"), b"hello from a step\n").unwrap();
    let opts = WriteOptions {
        compression: Compression::Gzip { level: 6 },
        epoch: Some(0),
        watch: Some(Arc::clone(watch)),
        deferred: Default::default(),
    };
    let written = write_layer(root, &[LayerEntry::Path("hello.txt".into())], blobs, &opts).unwrap();
    (written.digest, written.size)
}

#[test]
fn a_layer_goes_up_in_the_session_opened_while_it_was_written() {
    let reg = Registry::start();
    let client = client(&reg);
    let dest = format!("{}/team/early:1", reg.host);
    let early = EarlyUploads::new(&client, std::slice::from_ref(&dest));
    let tmp = tempfile::tempdir().unwrap();
    let name = Reference::parse(&dest).unwrap().name();
    // The layer's digest, known in advance: the same tree written once without watching.
    let expected = {
        let unwatched = GrowingBlob::new();
        let (d, _) =
            write_watched(&tmp.path().join("root0"), &tmp.path().join("blobs0"), &unwatched);
        d
    };
    let (digest, waited) = std::thread::scope(|scope| {
        scope.spawn(|| early.work());
        let watch = early.layer_starting().expect("a blob to stream");
        // The step takes a while to write its layer; the push asks in the meantime.
        let dir = tmp.path();
        let writer = scope.spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            write_watched(&dir.join("root"), &dir.join("blobs"), &watch)
        });
        early.close();
        let asked = Instant::now();
        let there = early.wait_for(&name, &expected.to_string());
        let waited = asked.elapsed();
        let (digest, _) = writer.join().unwrap();
        assert!(there, "the early upload of {digest} did not land");
        (digest, waited)
    });
    assert_eq!(digest, expected);
    assert!(waited >= Duration::from_millis(250), "answered before the layer was written");
    assert!(client.has_blob(&Reference::parse(&dest).unwrap(), &digest).unwrap());
    assert_eq!(open_sessions(&reg, "team/early"), Vec::<String>::new());
}

#[test]
fn a_layer_never_written_gives_its_session_back() {
    let reg = Registry::start();
    let client = client(&reg);
    let dest = format!("{}/team/none:1", reg.host);
    let early = EarlyUploads::new(&client, std::slice::from_ref(&dest));
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| early.work());
        let watch = early.layer_starting().expect("a blob to stream");
        // Let the worker open the session before the step finds it has nothing to store.
        let deadline = Instant::now() + Duration::from_secs(10);
        while open_sessions(&reg, "team/none").is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(open_sessions(&reg, "team/none").len(), 1, "the session was not opened early");
        watch.abandon();
        early.close();
        // Nothing is pending for any digest once the abandoned job ended.
        assert!(!early.wait_for("team/none", "sha256:0000"));
        worker.join().unwrap();
    });
    assert_eq!(open_sessions(&reg, "team/none"), Vec::<String>::new());
}
