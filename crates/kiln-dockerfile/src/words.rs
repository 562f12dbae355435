//! The single place where the frontend expands words (`$VAR`, `${VAR:-default}`, quotes), so
//! the word-expansion implementation can be swapped without touching planning code.

use crate::plan::Env;

/// Expands `word` with `env`, removing quotes, with `escape` as the escape character.
pub(crate) fn expand_word(word: &str, env: &Env, escape: char) -> Result<String, String> {
    crate::stopgap_shell::expand_word(word, env, escape).map_err(|e| e.to_string())
}
