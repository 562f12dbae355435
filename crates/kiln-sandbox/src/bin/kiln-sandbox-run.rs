//! `kiln-sandbox-run`: a small driver of [`kiln_sandbox::Sandbox`] for tests, benchmarks and
//! debugging. Not the kiln CLI.
//!
//! ```text
//! kiln-sandbox-run [--mode auto|rootless|chroot|in-place] [--force] [--user U] [--workdir D]
//!     [--env K=V]... [--network none] [--bind SRC:DST[:ro]]... [--tmpfs DST]...
//!     [--cache SRC:DST]... [--secret SRC:DST]... [--overlay UPPER:WORK] [--repeat N]
//!     [--report] ROOT -- ARGV...
//! ```
//! Output lines go to stdout/stderr; the exit code is the command's (128+N for signal N).
//! `--report` prints the mode, mount points and warnings to stderr as `kiln-sandbox: ...`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use kiln_sandbox::{Mode, Mount, Network, Overlay, RunSpec, Sandbox, Stream};

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kiln-sandbox-run: error: {e}");
            ExitCode::from(125)
        }
    }
}

fn split2(v: &str, what: &str) -> Result<(String, String, Option<String>), String> {
    let mut it = v.splitn(3, ':');
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), c) => Ok((a.into(), b.into(), c.map(String::from))),
        _ => Err(format!("{what} expects SRC:DST, got `{v}`")),
    }
}

fn real_main() -> Result<u8, String> {
    let mut args = std::env::args().skip(1);
    let mut mode = "auto".to_string();
    let mut force = false;
    let mut report = false;
    let mut repeat = 1u32;
    let mut spec = RunSpec::new("/", Vec::<String>::new());
    let mut root = None;
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--mode" => mode = val()?,
            "--force" => force = true,
            "--report" => report = true,
            "--repeat" => repeat = val()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            "--user" => spec.user = val()?,
            "--workdir" => spec.workdir = val()?.into(),
            "--env" => spec.env.push(val()?),
            "--network" => {
                spec.network = match val()?.as_str() {
                    "none" => Network::None,
                    "host" => Network::Host,
                    n => return Err(format!("unknown network `{n}`")),
                }
            }
            "--bind" => {
                let (s, d, o) = split2(&val()?, "--bind")?;
                spec.mounts.push(Mount::Bind {
                    source: s.into(),
                    target: d.into(),
                    readonly: o.as_deref() == Some("ro"),
                });
            }
            "--tmpfs" => spec.mounts.push(Mount::Tmpfs { target: val()?.into(), size: None }),
            "--cache" => {
                let (s, d, _) = split2(&val()?, "--cache")?;
                spec.mounts.push(Mount::Cache { source: s.into(), target: d.into() });
            }
            "--secret" => {
                let (s, d, _) = split2(&val()?, "--secret")?;
                spec.mounts.push(Mount::secret(s, d));
            }
            "--overlay" => {
                let (u, w, _) = split2(&val()?, "--overlay")?;
                spec.overlay = Some(Overlay { upper: u.into(), work: w.into() });
            }
            "--" => {
                spec.argv = args.by_ref().collect();
                break;
            }
            _ if root.is_none() && !a.starts_with("--") => root = Some(PathBuf::from(&a)),
            _ => return Err(format!("unexpected argument `{a}`")),
        }
    }
    spec.root = root.ok_or("missing ROOT")?;
    kiln_sandbox::install_signal_handlers();
    let sandbox = match mode.as_str() {
        "auto" => {
            let (s, choice) = Sandbox::auto().map_err(|e| e.to_string())?;
            if report {
                eprintln!("kiln-sandbox: mode {choice}");
            }
            s
        }
        m => {
            let mut m: Mode = m.parse().map_err(|e: kiln_sandbox::Error| e.to_string())?;
            if let Mode::InPlace { .. } = m {
                m = Mode::InPlace { force };
            }
            Sandbox::new(m)
        }
    };
    let mut code = 0;
    for _ in 0..repeat {
        let stdout = std::io::stdout();
        let stderr = std::io::stderr();
        let mut on_line = |l: kiln_sandbox::OutputLine<'_>| {
            let _ = match l.stream {
                Stream::Stdout => stdout.lock().write_all(&[l.line, b"\n"].concat()),
                Stream::Stderr => stderr.lock().write_all(&[l.line, b"\n"].concat()),
            };
        };
        let outcome = sandbox.run(&spec, &mut on_line).map_err(|e| e.to_string())?;
        if report {
            eprintln!("kiln-sandbox: mode {}", outcome.mode);
            for p in &outcome.mount_points {
                eprintln!("kiln-sandbox: mount point {}", p.display());
            }
            for p in &outcome.left_behind {
                eprintln!("kiln-sandbox: left behind {}", p.display());
            }
            for w in &outcome.warnings {
                eprintln!("kiln-sandbox: warning: {w}");
            }
            if let Some(x) = outcome.overlay_xattrs {
                eprintln!("kiln-sandbox: overlay xattrs {}", x.prefix());
            }
            eprintln!("kiln-sandbox: status {}", outcome.status);
        }
        code = match outcome.status {
            kiln_sandbox::ExitStatus::Code(c) => u8::try_from(c).unwrap_or(1),
            kiln_sandbox::ExitStatus::Signal(s) => u8::try_from(128 + s).unwrap_or(255),
        };
    }
    Ok(code)
}
