//! How a RUN instruction becomes a process: argv, environment and heredoc scripts, with
//! BuildKit's rules.
//!
//! - Shell form runs through the stage's SHELL (`/bin/sh -c` by default); exec form runs as is.
//! - A RUN whose whole command is one heredoc (`RUN <<EOF`) runs its body: as a script file
//!   mounted read-only at `/dev/pipes/<name>` (never into the root, so never into the layer)
//!   when it starts with `#!`, else as the shell's command line (`sh -c BODY`).
//! - Other heredocs (`RUN cat <<EOF > file`, several heredocs) are put back into the command
//!   text and left to the shell, as BuildKit does.
//! - The environment is the image's `Env`, then the build arguments in scope that ENV does not
//!   set (ENV wins over ARG of the same name).

use kiln_dockerfile::instructions::{CommandLine, Heredoc};

/// Where single-heredoc scripts are mounted inside the root.
pub const SCRIPT_DIR: &str = "/dev/pipes";

/// The process one RUN starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunCommand {
    pub argv: Vec<String>,
    /// A heredoc script to mount at `SCRIPT_DIR/<name>` (mode 0755), if any.
    pub script: Option<Script>,
}

/// A heredoc body run as a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub name: String,
    pub content: String,
}

/// Why a RUN cannot be turned into a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RunCommandError {
    #[error("RUN has an empty command")]
    Empty,
    #[error("RUN with heredocs needs the shell form, not a JSON array")]
    HeredocWithExec,
}

/// Builds the process for a RUN.
pub fn command(
    command: &CommandLine,
    heredocs: &[Heredoc],
    shell: &[String],
) -> Result<RunCommand, RunCommandError> {
    match command {
        CommandLine::Exec(argv) => {
            if !heredocs.is_empty() {
                return Err(RunCommandError::HeredocWithExec);
            }
            if argv.is_empty() {
                return Err(RunCommandError::Empty);
            }
            Ok(RunCommand { argv: argv.clone(), script: None })
        }
        CommandLine::Shell(line) => {
            if heredocs.is_empty() {
                if line.trim().is_empty() {
                    return Err(RunCommandError::Empty);
                }
                return Ok(RunCommand { argv: with_shell(shell, line), script: None });
            }
            if let [doc] = heredocs
                && is_lone_heredoc(line, &doc.name)
            {
                // A script with a shebang runs as a file; any other body is the shell's
                // command line (BuildKit ignores the expansion setting in both cases).
                if doc.content.starts_with("#!") {
                    return Ok(RunCommand {
                        argv: vec![format!("{SCRIPT_DIR}/{}", doc.name)],
                        script: Some(Script {
                            name: doc.name.clone(),
                            content: doc.content.clone(),
                        }),
                    });
                }
                return Ok(RunCommand { argv: with_shell(shell, &doc.content), script: None });
            }
            let mut full = line.clone();
            for doc in heredocs {
                full.push('\n');
                full.push_str(&doc.content);
                if !doc.content.is_empty() && !doc.content.ends_with('\n') {
                    full.push('\n');
                }
                full.push_str(&doc.name);
            }
            Ok(RunCommand { argv: with_shell(shell, &full), script: None })
        }
    }
}

/// `shell` + `line` (`["/bin/sh", "-c", line]` by default).
pub fn with_shell(shell: &[String], line: &str) -> Vec<String> {
    let mut argv: Vec<String> =
        if shell.is_empty() { vec!["/bin/sh".into(), "-c".into()] } else { shell.to_vec() };
    argv.push(line.to_owned());
    argv
}

/// Whether the command is only the heredoc marker (`<<EOF`, `<<-EOF`, `<<"EOF"`, `<<'EOF'`).
fn is_lone_heredoc(line: &str, name: &str) -> bool {
    let Some(rest) = line.trim().strip_prefix("<<") else { return false };
    let rest = rest.strip_prefix('-').unwrap_or(rest);
    let unquoted = rest
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
        .unwrap_or(rest);
    unquoted == name
}

/// The environment of a RUN: the image's variables, then the build arguments in scope that the
/// image does not set.
pub fn environment(image_env: &[String], args_in_scope: &[(String, String)]) -> Vec<String> {
    let mut env: Vec<String> = image_env.to_vec();
    for (k, v) in args_in_scope {
        let set = env.iter().any(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) == k);
        if !set {
            env.push(format!("{k}={v}"));
        }
    }
    env
}

/// The PATH a container gets when the image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, content: &str) -> Heredoc {
        Heredoc { name: name.into(), content: content.into(), expand: true }
    }

    #[test]
    fn shell_and_exec_forms() {
        let sh = vec!["/bin/bash".to_owned(), "-eo".into(), "pipefail".into(), "-c".into()];
        let c = command(&CommandLine::Shell("echo hi".into()), &[], &sh).unwrap_or_else(|e| {
            panic!("{e}");
        });
        assert_eq!(c.argv, ["/bin/bash", "-eo", "pipefail", "-c", "echo hi"]);
        let c = command(&CommandLine::Exec(vec!["ls".into(), "-l".into()]), &[], &sh);
        assert_eq!(c.map(|c| c.argv), Ok(vec!["ls".to_owned(), "-l".into()]));
        assert_eq!(command(&CommandLine::Exec(vec![]), &[], &sh), Err(RunCommandError::Empty));
        assert_eq!(
            command(&CommandLine::Shell("  ".into()), &[], &[]),
            Err(RunCommandError::Empty)
        );
    }

    #[test]
    fn lone_heredoc_is_a_script() {
        let c =
            command(&CommandLine::Shell("<<EOF".into()), &[doc("EOF", "echo a\necho b\n")], &[])
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.argv, ["/bin/sh", "-c", "echo a\necho b\n"]);
        assert!(c.script.is_none());
        let c = command(
            &CommandLine::Shell("<<'PY'".into()),
            &[doc("PY", "#!/usr/bin/python3\nprint(1)\n")],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.argv, ["/dev/pipes/PY"]);
    }

    #[test]
    fn other_heredocs_go_back_to_the_shell() {
        let c = command(
            &CommandLine::Shell("cat <<A > /a && cat <<B > /b".into()),
            &[doc("A", "one\n"), doc("B", "two\n")],
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.argv, ["/bin/sh", "-c", "cat <<A > /a && cat <<B > /b\none\nA\ntwo\nB"]);
        assert!(c.script.is_none());
    }

    #[test]
    fn env_wins_over_args() {
        let env = environment(
            &["PATH=/bin".into(), "A=image".into()],
            &[("A".into(), "arg".into()), ("B".into(), "arg".into())],
        );
        assert_eq!(env, ["PATH=/bin", "A=image", "B=arg"]);
    }
}
