//! Build contexts fetched from real sources started by the tests on 127.0.0.1: tar files,
//! http and https servers (a test CA made with rcgen), `git daemon` and git's smart HTTP
//! (`git http-backend` behind a small CGI server). Every failure must name the source without
//! its credentials and leave nothing in the work directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use kiln_context::{ContextError, Credentials, FetchOptions, GitPullMethod, Source, fetch};
use kiln_testutil::serve::{GitDaemon, GitFixture, HttpConfig, HttpServer};

fn read(dir: &Path, rel: &str) -> String {
    fs::read_to_string(dir.join(rel)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(rel).display()))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Fetches and expects failure; the work directory must be empty afterwards.
fn fails(context: &str, sub: Option<&str>, opts: &FetchOptions) -> String {
    let work = tempfile::tempdir().unwrap();
    let source = match Source::parse(context) {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    let err = fetch(&source, sub, work.path(), opts).expect_err(context);
    assert!(entries(work.path()).is_empty(), "{context}: left {:?}", entries(work.path()));
    err.to_string()
}

fn fetch_ok(context: &str, work: &Path, opts: &FetchOptions) -> kiln_context::PreparedContext {
    let source = Source::parse(context).unwrap();
    fetch(&source, None, work, opts).unwrap_or_else(|e| panic!("{context}: {e}"))
}

/// A tar with `hello.txt` = `text`, a nested file and a whiteout-looking name.
fn tarball(text: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [("hello.txt", text), ("dir/nested.txt", "nested"), ("dir/.wh.kept", "x")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A raw tar entry whose name is written as is (tar::Builder refuses `..`).
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o755);
    h.set_size(data.len() as u64);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn finish_tar(mut out: Vec<u8>) -> Vec<u8> {
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn local_directory_is_used_in_place_with_a_confined_sub_path() {
    let ctx = tempfile::tempdir().unwrap();
    fs::create_dir_all(ctx.path().join("app")).unwrap();
    fs::write(ctx.path().join("app/hello.txt"), "local").unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), ctx.path().join("escape")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let opts = FetchOptions::default();

    for written in [ctx.path().display().to_string(), format!("dir://{}", ctx.path().display())] {
        let p = fetch(&Source::parse(&written).unwrap(), None, work.path(), &opts).unwrap();
        assert_eq!(p.path(), ctx.path());
        assert!(!p.is_temporary());
        let p = fetch(&Source::parse(&written).unwrap(), Some("app"), work.path(), &opts).unwrap();
        assert_eq!(read(p.path(), "hello.txt"), "local");
    }
    assert!(entries(work.path()).is_empty(), "a local directory is not copied");

    let local = ctx.path().display().to_string();
    let e = fails(&local, Some("../x"), &opts);
    assert!(e.contains("sub-path `../x` must be relative"), "{e}");
    let e = fails(&local, Some("escape"), &opts);
    assert!(e.contains("leads outside the context"), "{e}");
    let e = fails(&local, Some("app/hello.txt"), &opts);
    assert!(e.contains("is not a directory"), "{e}");
    let e = fails("/nonexistent/kiln-context", None, &opts);
    assert!(e.contains("build context `/nonexistent/kiln-context`"), "{e}");
}

#[test]
fn tar_files_plain_gzip_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let plain = tarball("plain");
    fs::write(dir.path().join("c.tar"), &plain).unwrap();
    fs::write(dir.path().join("c.tar.gz"), gzip(&tarball("gzip"))).unwrap();
    fs::write(dir.path().join("c.tar.zst"), zstd::encode_all(&tarball("zstd")[..], 3).unwrap())
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let opts = FetchOptions::default();
    for (file, text) in [("c.tar", "plain"), ("c.tar.gz", "gzip"), ("c.tar.zst", "zstd")] {
        let path = dir.path().join(file);
        for written in [format!("tar://{}", path.display()), path.display().to_string()] {
            let p = fetch_ok(&written, work.path(), &opts);
            assert!(p.is_temporary());
            assert!(p.path().starts_with(work.path()));
            assert_eq!(read(p.path(), "hello.txt"), text);
            // A context is not a layer: whiteout names are plain files.
            assert_eq!(read(p.path(), "dir/.wh.kept"), "x");
            let sub =
                fetch(&Source::parse(&written).unwrap(), Some("dir"), work.path(), &opts).unwrap();
            assert_eq!(read(sub.path(), "nested.txt"), "nested");
            drop((p, sub));
            assert!(entries(work.path()).is_empty(), "dropping removes the unpacked context");
        }
    }

    let e = fails(&format!("tar://{}", dir.path().join("missing.tar").display()), None, &opts);
    assert!(e.contains("missing.tar"), "{e}");
    fs::write(
        dir.path().join("text.tar"),
        "this is not a tar archive, just some words\n".repeat(20),
    )
    .unwrap();
    let e = fails(&format!("tar://{}", dir.path().join("text.tar").display()), None, &opts);
    assert!(e.contains("text.tar") && e.contains("cannot unpack"), "{e}");
}

#[test]
fn tars_cannot_write_outside_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let opts = FetchOptions::default();

    // `..` in a name: refused.
    let mut t = Vec::new();
    raw_entry(&mut t, "ok.txt", tar::EntryType::Regular, "", b"fine");
    raw_entry(&mut t, "../evil", tar::EntryType::Regular, "", b"evil");
    let work = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("dotdot.tar"), finish_tar(t)).unwrap();
    let e = fails(&format!("tar://{}", dir.path().join("dotdot.tar").display()), None, &opts);
    assert!(e.contains("entry `../evil`") && e.contains("outside"), "{e}");
    assert!(!work.path().join("evil").exists() && !dir.path().join("evil").exists());

    // A symlink to an absolute directory, then a file through it: resolved inside the
    // context, as for layers (the symlink means the context's own directory of that name).
    let target = outside.path().display().to_string();
    let mut t = Vec::new();
    raw_entry(&mut t, "link", tar::EntryType::Symlink, &target, b"");
    raw_entry(&mut t, "link/evil", tar::EntryType::Regular, "", b"evil");
    raw_entry(&mut t, "up", tar::EntryType::Symlink, "../../../../../../..", b"");
    raw_entry(&mut t, "up/evil2", tar::EntryType::Regular, "", b"evil");
    fs::write(dir.path().join("symlink.tar"), finish_tar(t)).unwrap();
    let p = fetch_ok(
        &format!("tar://{}", dir.path().join("symlink.tar").display()),
        work.path(),
        &opts,
    );
    assert!(
        entries(outside.path()).is_empty(),
        "wrote through a symlink: {:?}",
        entries(outside.path())
    );
    assert!(!Path::new("/evil2").exists());
    let inside = p.path().join(target.trim_start_matches('/')).join("evil");
    assert_eq!(fs::read_to_string(inside).unwrap(), "evil");
    assert_eq!(read(p.path(), "evil2"), "evil");

    // A sub-path through a symlink that leaves the context.
    let e =
        fails(&format!("tar://{}", dir.path().join("symlink.tar").display()), Some("up"), &opts);
    assert!(e.contains("sub-path `up`"), "{e}");
}

#[test]
fn http_tarballs_and_their_failures() {
    let mut files = std::collections::BTreeMap::new();
    files.insert("/ctx.tar.gz".to_owned(), gzip(&tarball("over http")));
    files.insert("/ctx.tar".to_owned(), tarball("plain http"));
    files.insert("/page.html".to_owned(), b"<html>hello</html>".repeat(100));
    files.insert("/empty.tar".to_owned(), Vec::new());
    let server = HttpServer::start(HttpConfig { files, ..HttpConfig::default() });
    let base = server.base("http");
    let work = tempfile::tempdir().unwrap();
    let opts = FetchOptions::default();

    let p = fetch_ok(&format!("{base}/ctx.tar.gz"), work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "over http");
    let p2 = fetch_ok(&format!("{base}/ctx.tar"), work.path(), &opts);
    assert_eq!(read(p2.path(), "hello.txt"), "plain http");
    drop((p, p2));
    assert!(entries(work.path()).is_empty());

    let e =
        fails(&format!("http://kiln:s3cret@127.0.0.1:{}/missing.tar.gz", server.port), None, &opts);
    assert!(e.contains("404") && e.contains(&format!("{base}/missing.tar.gz")), "{e}");
    assert!(!e.contains("s3cret") && !e.contains("kiln:"), "{e}");
    let e = fails(&format!("{base}/page.html"), None, &opts);
    assert!(e.contains("page.html") && e.contains("cannot unpack"), "{e}");
    let e = fails(&format!("{base}/empty.tar"), None, &opts);
    assert!(e.contains("empty"), "{e}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = fails(&format!("http://user:pw@127.0.0.1:{closed}/ctx.tar"), None, &opts);
    assert!(
        e.contains(&format!("http://127.0.0.1:{closed}/ctx.tar")) && e.contains("download failed"),
        "{e}"
    );
    assert!(!e.contains("pw@"), "{e}");
    let e = fails("http://unreachable.invalid/ctx.tar", None, &opts);
    assert!(e.contains("unreachable.invalid"), "{e}");
}

/// A CA and a certificate for 127.0.0.1 signed by it; returns (CA PEM, TLS acceptor).
fn test_tls() -> (String, Arc<rustls::ServerConfig>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kiln test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca_cert.pem(), Arc::new(config))
}

fn tls_wrap(config: Arc<rustls::ServerConfig>) -> kiln_testutil::serve::Wrap {
    Arc::new(move |tcp| {
        let conn = rustls::ServerConnection::new(config.clone()).ok()?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // Finish the handshake here so a client that rejects the certificate ends it quietly.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).ok()?;
        }
        Some(Box::new(tls) as Box<dyn kiln_testutil::serve::Stream>)
    })
}

#[test]
fn https_tarball_with_a_private_ca() {
    let (ca_pem, tls) = test_tls();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    fs::write(&ca_file, ca_pem).unwrap();
    let mut files = std::collections::BTreeMap::new();
    files.insert("/ctx.tar.gz".to_owned(), gzip(&tarball("over https")));
    let server =
        HttpServer::start(HttpConfig { files, wrap: Some(tls_wrap(tls)), ..HttpConfig::default() });
    let url = format!("{}/ctx.tar.gz", server.base("https"));
    let work = tempfile::tempdir().unwrap();

    let e = fails(&url, None, &FetchOptions::default());
    assert!(e.contains(&url) && e.contains("download failed"), "unknown CA must fail: {e}");

    let trusted = FetchOptions { extra_ca_file: Some(ca_file.clone()), ..FetchOptions::default() };
    let p = fetch_ok(&url, work.path(), &trusted);
    assert_eq!(read(p.path(), "hello.txt"), "over https");

    let insecure = FetchOptions { insecure_tls: true, ..FetchOptions::default() };
    let p = fetch_ok(&url, work.path(), &insecure);
    assert_eq!(read(p.path(), "hello.txt"), "over https");

    let missing_ca = FetchOptions {
        extra_ca_file: Some(dir.path().join("nope.pem")),
        ..FetchOptions::default()
    };
    let e = fails(&url, None, &missing_ca);
    assert!(e.contains("nope.pem"), "{e}");
}

fn git_opts(method: GitPullMethod) -> FetchOptions {
    FetchOptions { git_pull_method: method, ..FetchOptions::default() }
}

#[test]
fn git_daemon_refs_tags_and_commits() {
    let fx = GitFixture::new();
    let daemon = GitDaemon::start(fx.root());
    let opts = git_opts(GitPullMethod::Git);
    let work = tempfile::tempdir().unwrap();
    // kaniko's form, without the scheme's `//` repeated: `git://HOST/REPO`.
    let base = daemon.url("repo.git");

    let p = fetch_ok(&base, work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "main");
    assert!(!p.path().join(".git").exists(), "the context has no .git");
    assert_eq!(entries(p.path()), ["Dockerfile", "hello.txt", "sub"]);
    let p = fetch_ok(&format!("{base}#refs/heads/dev"), work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "dev");
    let p = fetch_ok(&format!("{base}#dev"), work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "dev");
    let p = fetch_ok(&format!("{base}#v1"), work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "first");
    assert!(!p.path().join("sub").exists());
    let p = fetch_ok(&format!("{base}#refs/heads/main#{}", fx.first), work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "first");
    let p = fetch_ok(&format!("{base}#{}", &fx.second[..12]), work.path(), &opts);
    assert_eq!(read(p.path(), "hello.txt"), "main");
    let source = Source::parse(&format!("{base}#dev")).unwrap();
    let p = fetch(&source, Some("sub/dir"), work.path(), &opts).unwrap();
    assert_eq!(read(p.path(), "hello.txt"), "sub");
    drop(p);

    let e = fails(&format!("{base}#no-such-branch"), None, &opts);
    assert!(e.contains("has no branch or tag `no-such-branch`") && e.contains(&base), "{e}");
    let e = fails(&format!("{base}#refs/heads/main#{}", "0".repeat(40)), None, &opts);
    assert!(e.contains(&"0".repeat(40)), "{e}");
    let e = fails(&daemon.url("missing.git"), None, &opts);
    assert!(e.contains("missing.git"), "{e}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = fails(&format!("git://127.0.0.1:{closed}/repo.git"), None, &opts);
    assert!(e.contains(&format!("127.0.0.1:{closed}/repo.git")), "{e}");
}

#[test]
fn git_submodules_when_asked() {
    let fx = GitFixture::new();
    fx.add_superproject();
    let daemon = GitDaemon::start(fx.root());
    let work = tempfile::tempdir().unwrap();
    let url = daemon.url("app.git");
    let plain = fetch_ok(&url, work.path(), &git_opts(GitPullMethod::Git));
    assert_eq!(read(plain.path(), "app.txt"), "app");
    assert!(entries(&plain.path().join("modules/lib")).is_empty(), "not checked out unless asked");
    let mut recurse = git_opts(GitPullMethod::Git);
    let mut source = Source::parse(&url).unwrap();
    recurse.apply_git_flag("recurse-submodules=true,single-branch=true", &mut source).unwrap();
    assert!(recurse.git_recurse_submodules);
    let e = recurse.apply_git_flag("depth=1", &mut source).unwrap_err().to_string();
    assert!(e.contains("unknown option `depth`"), "{e}");
    let p = fetch_ok(&url, work.path(), &recurse);
    assert_eq!(read(p.path(), "modules/lib/lib.txt"), "lib");
    assert!(!p.path().join("modules/lib/.git").exists());
    drop((plain, p));
    assert!(entries(work.path()).is_empty(), "{:?}", entries(work.path()));

    // A submodule that cannot be fetched fails the whole context, naming it.
    std::fs::rename(fx.root().join("lib.git"), fx.root().join("gone.git")).unwrap();
    let e = fails(&url, None, &recurse);
    assert!(e.contains("submodule") && e.contains("lib.git"), "{e}");
}

#[test]
fn git_smart_http_with_subdirs_and_credentials() {
    let fx = GitFixture::new();
    let open = HttpServer::start(HttpConfig {
        git_root: Some(fx.root().to_path_buf()),
        ..HttpConfig::default()
    });
    let work = tempfile::tempdir().unwrap();
    let opts = FetchOptions::default();
    let url = format!("{}/repo.git", open.base("http"));

    assert_eq!(read(fetch_ok(&url, work.path(), &opts).path(), "hello.txt"), "main");
    assert_eq!(
        read(fetch_ok(&format!("{url}#dev:sub/dir"), work.path(), &opts).path(), "hello.txt"),
        "sub"
    );
    assert_eq!(
        read(fetch_ok(&format!("{url}#{}", fx.dev), work.path(), &opts).path(), "hello.txt"),
        "dev"
    );
    // kaniko's form over http.
    let kaniko = format!("git://127.0.0.1:{}/repo.git#refs/heads/dev", open.port);
    assert_eq!(
        read(fetch_ok(&kaniko, work.path(), &git_opts(GitPullMethod::Http)).path(), "hello.txt"),
        "dev"
    );
    let e = fails(&format!("{url}#v9"), None, &opts);
    assert!(e.contains("has no branch or tag `v9`") && e.contains(&url), "{e}");
    let e = fails(&format!("{url}#main:no/such/dir"), None, &opts);
    assert!(e.contains("no/such/dir"), "{e}");

    // Credentials go over https only (the transport refuses to send them in clear text).
    let (ca_pem, tls) = test_tls();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_file = ca_dir.path().join("ca.pem");
    fs::write(&ca_file, ca_pem).unwrap();
    let auth = Some(("kiln".to_owned(), "t0ken-secret".to_owned()));
    let locked = HttpServer::start(HttpConfig {
        git_root: Some(fx.root().to_path_buf()),
        basic_auth: auth.clone(),
        wrap: Some(tls_wrap(tls)),
        ..HttpConfig::default()
    });
    let url = format!("{}/repo.git", locked.base("https"));
    let tls_opts = FetchOptions { extra_ca_file: Some(ca_file.clone()), ..FetchOptions::default() };
    let with_env = FetchOptions {
        git_credentials: Some(Credentials {
            username: "kiln".into(),
            password: "t0ken-secret".into(),
        }),
        ..tls_opts.clone()
    };
    assert_eq!(
        read(fetch_ok(&format!("{url}#dev"), work.path(), &with_env).path(), "hello.txt"),
        "dev"
    );
    let in_url = format!("https://kiln:t0ken-secret@127.0.0.1:{}/repo.git#v1", locked.port);
    assert_eq!(read(fetch_ok(&in_url, work.path(), &tls_opts).path(), "hello.txt"), "first");

    let e = fails(&url, None, &tls_opts);
    assert!(e.contains(&url), "{e}");
    let wrong = format!("https://kiln:wr0ng-secret@127.0.0.1:{}/repo.git", locked.port);
    let e = fails(&wrong, None, &tls_opts);
    assert!(e.contains(&url) && !e.contains("wr0ng-secret") && !e.contains("kiln:"), "{e}");
    let e = fails(&url, None, &FetchOptions::default());
    assert!(e.contains(&url), "an unknown CA fails: {e}");

    let plain = HttpServer::start(HttpConfig {
        git_root: Some(fx.root().to_path_buf()),
        basic_auth: auth,
        ..HttpConfig::default()
    });
    let e =
        fails(&format!("http://kiln:t0ken-secret@127.0.0.1:{}/repo.git", plain.port), None, &opts);
    assert!(e.contains("clear text") && !e.contains("t0ken-secret"), "{e}");
    assert!(entries(work.path()).is_empty(), "{:?}", entries(work.path()));
}

#[test]
fn errors_have_hints_and_object_urls_use_the_store_interface() {
    let e = Source::parse("ftp://host/ctx.tar").unwrap_err();
    assert!(matches!(e, ContextError::Invalid { .. }));
    assert!(e.hint().unwrap().contains("tar://"));
    let e = fails("git://host/repo.git#main#not-a-commit", None, &FetchOptions::default());
    assert!(e.contains("not-a-commit"), "{e}");
    // `s3://` and `gs://` go to the object-store module only (its own tests cover it).
    match Source::parse("s3://bucket/ctx.tar.gz") {
        Ok(Source::Object(_, written)) => assert_eq!(written, "s3://bucket/ctx.tar.gz"),
        Ok(other) => panic!("{other:?}"),
        Err(e) => assert!(e.to_string().contains("s3://bucket/ctx.tar.gz"), "{e}"),
    }
}
