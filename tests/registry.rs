//! The registry is the one list of backends: every scheme in it has the whole conformance
//! suite and the lock kinds' suite run on it, and URLs are classified by it alone.

use fencelock::Scheme;
use std::path::Path;

/// `tests/conformance_<name>.rs` for the scheme's canonical name (`+` written `_`).
fn conformance_file(scheme: Scheme) -> std::path::PathBuf {
    let name = scheme.names()[0].replace('+', "_");
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(format!("conformance_{name}.rs"))
}

#[test]
fn every_scheme_runs_the_conformance_suite() {
    for &scheme in Scheme::ALL {
        let file = conformance_file(scheme);
        let text = std::fs::read_to_string(&file).unwrap_or_else(|err| {
            panic!(
                "{scheme}: no conformance suite at {}: {err}",
                file.display()
            )
        });
        // Code only: a suite named in a comment does not run. A file may invoke the
        // suites through a macro of its own (one module per test server).
        let code: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for suite in ["conformance_tests", "conformance_kind_tests"] {
            assert!(
                code.contains(suite),
                "{scheme}: {} does not run the suite {suite}!",
                file.display()
            );
        }
    }
}

#[test]
fn every_name_of_every_scheme_parses_back_to_it() {
    for &scheme in Scheme::ALL {
        for name in scheme.names() {
            assert_eq!(Scheme::of(&format!("{name}://x")).unwrap(), scheme);
            assert_eq!(
                Scheme::of(&format!("{}://x", name.to_uppercase())).unwrap(),
                scheme
            );
        }
        let (usage, what) = scheme.usage();
        assert!(!what.is_empty());
        assert_eq!(Scheme::of(usage).unwrap(), scheme, "{usage}");
    }
}

#[tokio::test]
async fn a_scheme_not_built_names_its_feature() {
    for &scheme in Scheme::ALL {
        if scheme.is_enabled() {
            continue;
        }
        let url = format!("{}://127.0.0.1:1", scheme.names()[0]);
        let err = fencelock::connect(&url).await.unwrap_err().to_string();
        assert!(err.contains(scheme.feature()), "{err}");
        assert!(err.contains("not enabled in this build"), "{err}");
    }
}

#[test]
fn nothing_unknown_is_advertised() {
    let err = Scheme::of("consul://127.0.0.1:8500")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown backend"), "{err}");
    for &scheme in Scheme::ALL {
        assert!(err.contains(&format!("{}://", scheme.names()[0])), "{err}");
    }
}
