//! `RUN --mount` preparation: sources, scratch copies, caches, secrets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use kiln_build::mounts::{MountError, MountInputs, prepare};
use kiln_build::options::SecretSpec;
use kiln_dockerfile::instructions::MountSpec;

fn mount(raw: &str) -> kiln_dockerfile::instructions::Mount {
    MountSpec::parse(raw).unwrap().mount.expect("a mount without variables is validated")
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("ctx/sub")).unwrap();
        fs::write(dir.path().join("ctx/sub/file"), "ctx").unwrap();
        fs::create_dir_all(dir.path().join("scratch")).unwrap();
        fs::create_dir_all(dir.path().join("stage/opt")).unwrap();
        fs::write(dir.path().join("secret.txt"), "s3cr3t").unwrap();
        Env { dir }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

fn inputs<'a>(
    secrets: &'a [SecretSpec],
    from: &'a dyn Fn(&str) -> Option<PathBuf>,
    paths: &'a (PathBuf, PathBuf, PathBuf),
) -> MountInputs<'a> {
    MountInputs {
        context: &paths.0,
        from_root: from,
        cache_root: &paths.1,
        scratch: &paths.2,
        secrets,
        workdir: "/work",
    }
}

#[test]
fn bind_cache_tmpfs_and_secrets() {
    let env = Env::new();
    let paths = (env.p("ctx"), env.p("cache"), env.p("scratch"));
    let stage = env.p("stage");
    let from = move |name: &str| (name == "build").then(|| stage.clone());
    let secrets =
        vec![SecretSpec::parse(&format!("id=file,src={}", env.p("secret.txt").display())).unwrap()];
    let inp = inputs(&secrets, &from, &paths);
    let mounts = [
        mount("type=bind,source=sub,target=/src"),
        mount("type=bind,from=build,source=/opt,target=rel"),
        mount("type=bind,source=sub,target=/rw,rw"),
        mount("type=cache,target=/root/.cache,id=pip,mode=0700"),
        mount("type=tmpfs,target=/tmp,size=1048576"),
        mount("type=secret,id=file"),
    ];
    let prepared = prepare(&mounts, &inp).unwrap();
    let m = prepared.mounts.clone();
    assert_eq!(m.len(), 6);
    assert_eq!(
        m[0],
        kiln_sandbox::Mount::Bind {
            source: env.p("ctx/sub"),
            target: "/src".into(),
            readonly: true
        }
    );
    assert_eq!(
        m[1],
        kiln_sandbox::Mount::Bind {
            source: env.p("stage/opt"),
            target: "/work/rel".into(),
            readonly: true
        }
    );
    // A writable bind gets a scratch copy, never the context itself.
    let kiln_sandbox::Mount::Bind { source: rw, readonly: false, .. } = &m[2] else {
        panic!("{:?}", m[2])
    };
    assert!(rw.starts_with(env.p("scratch")));
    assert_eq!(fs::read_to_string(rw.join("file")).unwrap(), "ctx");
    let kiln_sandbox::Mount::Cache { source: cache, target } = m[3].clone() else {
        panic!("{:?}", m[3])
    };
    assert!(cache.starts_with(env.p("cache")) && cache.is_dir());
    assert_eq!(target, Path::new("/root/.cache"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(m[4], kiln_sandbox::Mount::Tmpfs { target: "/tmp".into(), size: Some(1_048_576) });
    assert_eq!(m[5], kiln_sandbox::Mount::secret(env.p("secret.txt"), "/run/secrets/file"));
    let scratch = prepared.scratch_dirs().iter().map(|p| p.to_path_buf()).collect::<Vec<_>>();
    drop(prepared);
    assert!(scratch.iter().all(|p| !p.exists()), "scratch copies are removed after the run");

    // The same cache id maps to the same directory next time.
    let again = prepare(&[mount("type=cache,target=/x,id=pip")], &inp).unwrap();
    assert_eq!(again.mounts[0], kiln_sandbox::Mount::Cache { source: cache, target: "/x".into() });
}

#[test]
fn secret_errors_and_env_secrets() {
    let env = Env::new();
    let paths = (env.p("ctx"), env.p("cache"), env.p("scratch"));
    let from = |_: &str| None;
    let none: Vec<SecretSpec> = Vec::new();
    let inp = inputs(&none, &from, &paths);
    let err = prepare(&[mount("type=secret,id=npm,required")], &inp).unwrap_err();
    assert!(matches!(err, MountError::MissingSecret { .. }));
    assert!(err.hint().unwrap().contains("--secret id=npm"));
    // Optional and absent: nothing is mounted.
    assert!(prepare(&[mount("type=secret,id=npm")], &inp).unwrap().mounts.is_empty());

    let secrets =
        vec![SecretSpec::parse(&format!("id=tok,src={}", env.p("secret.txt").display())).unwrap()];
    let inp = inputs(&secrets, &from, &paths);
    let prepared = prepare(&[mount("type=secret,id=tok,env=TOKEN")], &inp).unwrap();
    assert!(prepared.mounts.is_empty());
    assert_eq!(prepared.secret_env, vec!["TOKEN=s3cr3t".to_owned()]);
    assert_eq!(prepared.secret_env_names(), vec!["TOKEN"]);
    let err = prepare(&[mount("type=bind,source=nope,target=/n")], &inp).unwrap_err();
    assert!(matches!(err, MountError::BindSourceMissing { .. }), "{err}");
    let err = prepare(&[mount("type=bind,from=ghost,target=/n")], &inp).unwrap_err();
    assert!(matches!(err, MountError::UnknownFrom { .. }), "{err}");
}
