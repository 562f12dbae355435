//! Properties of word expansion on arbitrary input: it never panics (errors are values), and
//! text without any character the expander treats specially comes back unchanged.
#![allow(clippy::unwrap_used)]

use kiln_dockerfile::shell::{MapEnv, ShellLexer};
use proptest::prelude::*;

/// Strings dense in the characters the expander cares about.
fn shellish() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            4 => proptest::sample::select(vec![
                '$', '{', '}', ':', '-', '+', '?', '#', '%', '/', '*', '\\', '`', '"', '\'', '<',
                ' ', '\t', 'A', 'B', 'x', '0', '@', '한', '\u{feff}', '\n',
            ]),
            1 => any::<char>(),
        ],
        0..64,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

fn lexer(escape: char, flags: u8) -> ShellLexer {
    ShellLexer {
        raw_quotes: flags & 1 != 0,
        raw_escapes: flags & 2 != 0,
        skip_process_quotes: flags & 4 != 0,
        skip_unset_env: flags & 8 != 0,
        ..ShellLexer::new(escape)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn expansion_never_panics(
        word in shellish(),
        a in shellish(),
        escape in prop_oneof![Just('\\'), Just('`')],
        flags in 0u8..16,
    ) {
        let env = MapEnv::from_pairs([("A", a.as_str()), ("B", ""), ("한", "k")]);
        let lexer = lexer(escape, flags);
        if let Ok(expansion) = lexer.process_word(&word, &env) {
            // Words never contain the whitespace they were split at, and are never empty.
            for w in &expansion.words {
                prop_assert!(!w.is_empty());
            }
        }
    }

    #[test]
    fn plain_text_is_unchanged(word in "[a-zA-Z0-9_./=,:@ -]{0,40}") {
        let expansion = ShellLexer::new('\\').process_word(&word, &MapEnv::default()).unwrap();
        prop_assert_eq!(&expansion.value, &word);
        let words: Vec<&str> = word.split_whitespace().collect();
        prop_assert_eq!(expansion.words, words);
    }
}
