//! Snippets for `dynspec fold` and filetests: parse, specialize, render (being written).
