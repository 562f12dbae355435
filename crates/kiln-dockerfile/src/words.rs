//! The single place where planning expands words (`$VAR`, `${VAR:-default}`, quotes), with
//! BuildKit's rules from [`crate::shell`].

use crate::plan::Env;
use crate::shell::ShellLexer;

/// Expands `word` with `env`, removing quotes, with `escape` as the escape character.
pub(crate) fn expand_word(word: &str, env: &Env, escape: char) -> Result<String, String> {
    ShellLexer::new(escape).process_word(word, env).map(|e| e.value).map_err(|e| e.message)
}

/// Expands `word` and splits the result at unquoted whitespace (BuildKit does this for EXPOSE,
/// where `EXPOSE $PORTS` may name several ports).
pub(crate) fn expand_words(word: &str, env: &Env, escape: char) -> Result<Vec<String>, String> {
    ShellLexer::new(escape).process_words(word, env).map_err(|e| e.message)
}

/// Expands the body of a heredoc whose delimiter was not quoted (`COPY <<EOF /dst`): variables
/// and `\` escapes (always `\`, whatever `# escape=` says, as in BuildKit), but quotes are
/// ordinary text (BuildKit's `SkipProcessQuotes`).
pub(crate) fn expand_heredoc(body: &str, env: &Env) -> Result<String, String> {
    let lexer = ShellLexer { skip_process_quotes: true, ..ShellLexer::new('\\') };
    lexer.process_word(body, env).map(|e| e.value).map_err(|e| e.message)
}
