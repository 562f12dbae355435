//! COPY semantics against real directory trees: sources, wildcards, destinations, owners,
//! modes, links, `.dockerignore`, `--exclude`, `--parents`, and confinement to the roots.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use kiln_build::copy::{Chmod, CopyError, CopyOutcome, CopyRequest, SourceKind, copy};
use kiln_dockerfile::dockerignore::DockerIgnore;

struct Fixture {
    _dir: tempfile::TempDir,
    ctx: PathBuf,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    let root = dir.path().join("root");
    fs::create_dir_all(ctx.join("src/sub")).unwrap();
    fs::create_dir_all(root.join("app")).unwrap();
    fs::write(ctx.join("a.txt"), "a").unwrap();
    fs::write(ctx.join("b.txt"), "b").unwrap();
    fs::write(ctx.join("c.md"), "c").unwrap();
    fs::write(ctx.join("src/main.rs"), "fn main() {}").unwrap();
    fs::write(ctx.join("src/sub/deep.rs"), "deep").unwrap();
    fs::set_permissions(ctx.join("src/main.rs"), fs::Permissions::from_mode(0o750)).unwrap();
    Fixture { _dir: dir, ctx, root }
}

#[derive(Default)]
struct Opts<'a> {
    ignore: Option<&'a DockerIgnore>,
    exclude: Option<&'a DockerIgnore>,
    parents: bool,
    owner: Option<(u32, u32)>,
    chmod: Option<&'a Chmod>,
}

fn run(f: &Fixture, sources: &[&str], dest: &str) -> Result<CopyOutcome, CopyError> {
    run_with(f, sources, dest, Opts::default())
}

fn run_with(
    f: &Fixture,
    sources: &[&str],
    dest: &str,
    o: Opts<'_>,
) -> Result<CopyOutcome, CopyError> {
    let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
    let req = CopyRequest {
        src_root: &f.ctx,
        src_kind: SourceKind::Context,
        sources: &sources,
        dest,
        workdir: "/app",
        ignore: o.ignore,
        exclude: o.exclude,
        parents: o.parents,
        owner: o.owner,
        chmod: o.chmod,
        defer_files: false,
    };
    copy(&req, &f.root)
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap()
}

#[test]
fn file_to_new_name_and_into_directory() {
    let f = fixture();
    run(&f, &["a.txt"], "/renamed").unwrap();
    assert_eq!(read(&f.root.join("renamed")), "a");
    run(&f, &["a.txt"], "/dir/").unwrap();
    assert_eq!(read(&f.root.join("dir/a.txt")), "a");
    // An existing directory receives the file even without a trailing slash.
    run(&f, &["b.txt"], "/app").unwrap();
    assert_eq!(read(&f.root.join("app/b.txt")), "b");
    // Relative destinations are relative to WORKDIR.
    let out = run(&f, &["c.md"], "docs/").unwrap();
    assert_eq!(read(&f.root.join("app/docs/c.md")), "c");
    assert_eq!(out.changed, vec!["app/docs".to_owned(), "app/docs/c.md".to_owned()]);
}

#[test]
fn directory_copies_its_contents() {
    let f = fixture();
    run(&f, &["src"], "/code").unwrap();
    assert_eq!(read(&f.root.join("code/main.rs")), "fn main() {}");
    assert_eq!(read(&f.root.join("code/sub/deep.rs")), "deep");
    assert!(!f.root.join("code/src").exists());
    let mode = fs::metadata(f.root.join("code/main.rs")).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o750);
    // `.` is the whole context.
    run(&f, &["."], "/all/").unwrap();
    assert!(f.root.join("all/src/sub/deep.rs").is_file());
    assert!(f.root.join("all/a.txt").is_file());
}

#[test]
fn wildcards_match_per_component_and_may_match_nothing() {
    let f = fixture();
    let out = run(&f, &["*.txt"], "/w/").unwrap();
    assert_eq!(out.files, 2);
    assert!(f.root.join("w/a.txt").is_file() && f.root.join("w/b.txt").is_file());
    assert!(!f.root.join("w/c.md").exists());
    run(&f, &["src/*/*.rs"], "/deep/").unwrap();
    assert!(f.root.join("deep/deep.rs").is_file());
    let none = run(&f, &["*.nothing"], "/n/").unwrap();
    assert_eq!(none.files, 0);
    // A literal path must exist, and the error says so.
    let err = run(&f, &["missing.txt"], "/m/").unwrap_err();
    assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("missing.txt"));
}

#[test]
fn several_sources_need_a_directory_destination() {
    let f = fixture();
    let err = run(&f, &["a.txt", "b.txt"], "/file").unwrap_err();
    assert!(matches!(err, CopyError::DestNotDir { .. }));
    assert_eq!(err.hint().unwrap(), "write the destination as `/file/`");
    run(&f, &["a.txt", "b.txt"], "/multi/").unwrap();
    assert!(f.root.join("multi/b.txt").is_file());
}

#[test]
fn dockerignore_hides_files_and_names_the_reason() {
    let f = fixture();
    let ig = DockerIgnore::parse("*.txt\n!b.txt\nsrc/sub\n").unwrap();
    run_with(&f, &["."], "/ctx/", Opts { ignore: Some(&ig), ..Opts::default() }).unwrap();
    assert!(!f.root.join("ctx/a.txt").exists());
    assert!(f.root.join("ctx/b.txt").exists());
    assert!(!f.root.join("ctx/src/sub").exists());
    assert!(f.root.join("ctx/src/main.rs").exists());
    let err =
        run_with(&f, &["a.txt"], "/x", Opts { ignore: Some(&ig), ..Opts::default() }).unwrap_err();
    assert!(err.to_string().contains(".dockerignore"), "{err}");
    assert!(err.hint().unwrap().contains(".dockerignore"));
}

#[test]
fn exclude_and_parents() {
    let f = fixture();
    let ex = DockerIgnore::new(["**/*.rs"]).unwrap();
    run_with(&f, &["."], "/ex/", Opts { exclude: Some(&ex), ..Opts::default() }).unwrap();
    assert!(f.root.join("ex/a.txt").exists());
    assert!(!f.root.join("ex/src/main.rs").exists());
    assert!(!f.root.join("ex/src/sub/deep.rs").exists());

    run_with(&f, &["src/sub/deep.rs", "a.txt"], "/p/", Opts { parents: true, ..Opts::default() })
        .unwrap();
    assert!(f.root.join("p/src/sub/deep.rs").is_file());
    assert!(f.root.join("p/a.txt").is_file());
    run_with(&f, &["src/./sub/deep.rs"], "/q/", Opts { parents: true, ..Opts::default() }).unwrap();
    assert!(f.root.join("q/sub/deep.rs").is_file());
}

#[test]
fn owners_and_modes() {
    let f = fixture();
    let chmod = Chmod::parse("640").unwrap();
    run_with(&f, &["a.txt"], "/m/", Opts { chmod: Some(&chmod), ..Opts::default() }).unwrap();
    assert_eq!(fs::metadata(f.root.join("m/a.txt")).unwrap().mode() & 0o7777, 0o640);
    if rustix::process::geteuid().is_root() {
        run_with(&f, &["src"], "/owned", Opts { owner: Some((1000, 1001)), ..Opts::default() })
            .unwrap();
        for p in ["owned", "owned/main.rs", "owned/sub/deep.rs"] {
            let m = fs::metadata(f.root.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (1000, 1001), "{p}");
        }
        // Context files default to root.
        let m = fs::metadata(f.root.join("m/a.txt")).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0));
    }
}

#[test]
fn links_are_kept_and_mtimes_preserved() {
    let f = fixture();
    symlink("a.txt", f.ctx.join("link")).unwrap();
    fs::hard_link(f.ctx.join("b.txt"), f.ctx.join("src/b-hard")).unwrap();
    filetime::set_file_mtime(f.ctx.join("c.md"), filetime::FileTime::from_unix_time(1_000_000, 0))
        .unwrap();
    run(&f, &["."], "/l/").unwrap();
    assert_eq!(fs::read_link(f.root.join("l/link")).unwrap(), Path::new("a.txt"));
    let b = fs::metadata(f.root.join("l/b.txt")).unwrap();
    let hard = fs::metadata(f.root.join("l/src/b-hard")).unwrap();
    assert_eq!(b.ino(), hard.ino());
    assert_eq!(fs::metadata(f.root.join("l/c.md")).unwrap().mtime(), 1_000_000);
    // A symlink named as the source is followed.
    run(&f, &["link"], "/followed").unwrap();
    assert_eq!(read(&f.root.join("followed")), "a");
}

#[test]
fn nothing_is_written_outside_the_destination_root() {
    let f = fixture();
    let outside = f.root.parent().unwrap().join("outside");
    fs::create_dir_all(&outside).unwrap();
    symlink("../../outside", f.root.join("app/escape")).unwrap();
    symlink("/../../outside", f.root.join("abs-escape")).unwrap();
    run(&f, &["a.txt"], "/app/escape/").unwrap();
    run(&f, &["b.txt"], "/abs-escape/").unwrap();
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert!(f.root.join("outside/a.txt").is_file());
    assert!(f.root.join("outside/b.txt").is_file());
    // Sources cannot leave the context either.
    let err = run(&f, &["../root/app"], "/x/");
    assert!(err.is_err() || !f.root.join("x/escape").exists());
    symlink("/etc", f.ctx.join("etc-link")).unwrap();
    let err = run(&f, &["etc-link/passwd"], "/leak").unwrap_err();
    assert!(matches!(err, CopyError::NotFound { .. }), "{err}");
}

#[test]
fn type_changes_replace_existing_entries() {
    let f = fixture();
    fs::create_dir_all(f.root.join("t/a.txt/inner")).unwrap();
    run(&f, &["a.txt"], "/t/").unwrap();
    assert!(f.root.join("t/a.txt").is_file());
    fs::write(f.root.join("sub"), "file").unwrap();
    run(&f, &["src"], "/").unwrap();
    assert!(f.root.join("sub/deep.rs").is_file());
}
