//! The report's JSON Schema: generated from the report types, committed as `docs/report.schema.json`, and used to
//! check every report dynspec reads.

use std::sync::OnceLock;

use super::Report;

/// The schema as committed (`docs/report.schema.json`); a test keeps it equal to [`generate`].
pub const SCHEMA: &str = include_str!("../../docs/report.schema.json");

/// The schema of [`Report`], generated from its types (their doc comments become the descriptions).
pub fn generate() -> String {
    let schema = schemars::schema_for!(Report);
    // Serialising a JSON value cannot fail.
    let mut s = serde_json::to_string_pretty(&schema).unwrap_or_default();
    s.push('\n');
    s
}

/// The compiled validator for [`SCHEMA`]; `None` if the committed file does not compile (a test catches that).
fn validator() -> Option<&'static jsonschema::Validator> {
    static V: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).ok()?;
        jsonschema::validator_for(&schema).ok()
    })
    .as_ref()
}

/// Check a report document against the schema. The error names the first problem and where it is, as a JSON
/// pointer (`/variants/0/entries: "x" is not of type "integer"`), and how many more there are.
pub fn check(report: &serde_json::Value) -> Result<(), String> {
    let Some(v) = validator() else {
        return Err("this dynspec's report schema does not compile (a build problem)".into());
    };
    let problems: Vec<String> = v
        .iter_errors(report)
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            format!("at {at}: {e}")
        })
        .collect();
    match problems.split_first() {
        None => Ok(()),
        Some((first, [])) => Err(first.clone()),
        Some((first, rest)) => Err(format!("{first} (and {} more)", rest.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed schema is the one the types generate (`DYNSPEC_BLESS=1` rewrites it).
    #[test]
    fn committed_schema_is_current() {
        let generated = generate();
        if std::env::var_os("DYNSPEC_BLESS").is_some() {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/report.schema.json");
            std::fs::write(path, &generated).expect("write docs/report.schema.json");
            return;
        }
        assert!(
            generated == SCHEMA,
            "docs/report.schema.json is stale: run `DYNSPEC_BLESS=1 cargo test -p dynspec --lib schema` and commit it"
        );
        assert!(
            validator().is_some(),
            "the committed schema does not compile"
        );
    }
}
