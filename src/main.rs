//! dynspec: the command-line tool. Drives tracer, specializer and codecache.
fn main() {}
