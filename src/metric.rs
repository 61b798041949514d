//! The unit of work a user names for measuring variants (`--metric`): parsed from the command line, resolved to
//! a code address in the target's modules.

use std::fmt;
use std::str::FromStr;

use tracer::symbols::{symbolize, Module};
use tracer::Addr;

/// What one unit of the program's work is: one execution of the instruction at a function's entry (or at an
/// address the user gives), counted by a counting stub there while a variant is measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Metric {
    /// `calls:NAME`: calls of the function named NAME, a symbol or the `module+0xVADDR` name the report gives
    /// a function without one.
    CallsOf(String),
    /// `calls:0xADDRESS`: passes through this runtime address (inside a known function).
    CallsAt(Addr),
}

/// Why a `--metric` argument was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    #[error("unknown metric `{0}`: use calls:SYMBOL, calls:MODULE+0xVADDR (as the report names a function) or calls:0xADDRESS")]
    Unknown(String),
    #[error("`calls:` needs a function: calls:SYMBOL, calls:MODULE+0xVADDR or calls:0xADDRESS")]
    Empty,
    #[error("`{0}` is not an address: write it in hex as 0x...")]
    BadAddress(String),
}

impl FromStr for Metric {
    type Err = MetricError;

    fn from_str(s: &str) -> Result<Metric, MetricError> {
        let Some(what) = s.strip_prefix("calls:") else {
            return Err(MetricError::Unknown(s.to_string()));
        };
        let what = what.trim();
        if what.is_empty() {
            return Err(MetricError::Empty);
        }
        match what.strip_prefix("0x").or_else(|| what.strip_prefix("0X")) {
            Some(hex) => u64::from_str_radix(hex, 16)
                .ok()
                .filter(|&a| a != 0)
                .map(|a| Metric::CallsAt(Addr(a)))
                .ok_or_else(|| MetricError::BadAddress(what.to_string())),
            None => Ok(Metric::CallsOf(what.to_string())),
        }
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Metric::CallsOf(name) => write!(f, "calls:{name}"),
            Metric::CallsAt(a) => write!(f, "calls:{a}"),
        }
    }
}

/// Where a metric counts: the address a counting stub goes to, and the function around it (the stub's patch
/// must stay inside it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Site {
    pub at: Addr,
    pub function: (Addr, Addr),
}

impl Metric {
    /// The metric's site in these modules, or why there is none.
    pub fn resolve(&self, modules: &[Module]) -> Result<Site, String> {
        match self {
            Metric::CallsOf(name) => modules
                .iter()
                .find_map(|m| m.symbol(name))
                .map(|s| Site {
                    at: s.start,
                    function: (s.start, s.end),
                })
                .ok_or_else(|| format!("no function named {name} in the program's modules")),
            Metric::CallsAt(a) => match symbolize(modules, *a) {
                Some((_, Some(s))) => Ok(Site {
                    at: *a,
                    function: (s.start, s.end),
                }),
                Some((m, None)) => Err(format!(
                    "{a} is in {} but in no function dynspec knows the bounds of",
                    m.path.display()
                )),
                None => Err(format!("{a} is in no module of the program")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use tracer::symbols::Symbol;

    fn module() -> Module {
        Module {
            path: PathBuf::from("/usr/bin/prog"),
            base: Addr(0x5000_0000),
            start: Addr(0x5000_0000),
            end: Addr(0x5001_0000),
            symbols: vec![
                Symbol {
                    name: "step".into(),
                    start: Addr(0x5000_1000),
                    end: Addr(0x5000_1040),
                },
                Symbol {
                    name: "prog+0x2000".into(),
                    start: Addr(0x5000_2000),
                    end: Addr(0x5000_2400),
                },
            ],
        }
    }

    #[test]
    fn parses_names_and_addresses() {
        assert_eq!("calls:step".parse(), Ok(Metric::CallsOf("step".into())));
        assert_eq!(
            "calls:prog+0x2000".parse(),
            Ok(Metric::CallsOf("prog+0x2000".into()))
        );
        assert_eq!(
            "calls:0x50001010".parse(),
            Ok(Metric::CallsAt(Addr(0x5000_1010)))
        );
        assert_eq!(
            "calls:0x50001010".parse::<Metric>().unwrap().to_string(),
            "calls:0x50001010"
        );
    }

    #[test]
    fn refuses_what_it_cannot_count() {
        assert_eq!(
            "instructions".parse::<Metric>(),
            Err(MetricError::Unknown("instructions".into()))
        );
        assert_eq!("calls:".parse::<Metric>(), Err(MetricError::Empty));
        assert_eq!(
            "calls:0xzz".parse::<Metric>(),
            Err(MetricError::BadAddress("0xzz".into()))
        );
        assert_eq!(
            "calls:0x0".parse::<Metric>(),
            Err(MetricError::BadAddress("0x0".into()))
        );
    }

    #[test]
    fn resolves_to_the_function_around_it() {
        let mods = [module()];
        let site = Metric::CallsOf("step".into()).resolve(&mods).unwrap();
        assert_eq!(site.at, Addr(0x5000_1000));
        assert_eq!(site.function, (Addr(0x5000_1000), Addr(0x5000_1040)));
        let site = Metric::CallsOf("prog+0x2000".into())
            .resolve(&mods)
            .unwrap();
        assert_eq!(site.function.1, Addr(0x5000_2400));
        let site = Metric::CallsAt(Addr(0x5000_2010)).resolve(&mods).unwrap();
        assert_eq!(site.at, Addr(0x5000_2010));
        assert_eq!(site.function.0, Addr(0x5000_2000));
        assert!(Metric::CallsOf("nope".into()).resolve(&mods).is_err());
        assert!(Metric::CallsAt(Addr(0x5000_3000)).resolve(&mods).is_err());
        assert!(Metric::CallsAt(Addr(0x9000_0000)).resolve(&mods).is_err());
    }
}
