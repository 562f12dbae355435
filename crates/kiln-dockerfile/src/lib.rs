//! The Dockerfile frontend: text to AST (with line numbers), word expansion, typed instructions,
//! stages and `.dockerignore` matching. Pure: no I/O, no network.
