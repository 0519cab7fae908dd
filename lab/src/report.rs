//! The one report writer: a run's verdicts as a JSON report, a JUnit XML
//! file (for CI systems) and a readable table, for the fault campaign
//! ([`crate::campaign`]) and user projects ([`crate::project`]) alike.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// One verdict as JUnit sees it.
#[derive(Debug, Clone, Copy)]
pub struct Case<'a> {
    /// The test case's name.
    pub name: &'a str,
    /// Passed.
    pub pass: bool,
    /// One line: what went wrong (the failure's message).
    pub message: &'a str,
    /// The failure's text (console lines, the program's output).
    pub detail: &'a str,
    /// What the case printed, if the report keeps it.
    pub output: Option<&'a str>,
}

/// Escape text for XML attributes and content.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A JUnit XML test suite of `cases`, each with `classname`.
pub fn junit(suite: &str, classname: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| !c.pass).count();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\">\n",
        xml_escape(suite),
        cases.len()
    );
    for c in cases {
        let _ = write!(
            xml,
            "  <testcase classname=\"{}\" name=\"{}\">",
            xml_escape(classname),
            xml_escape(c.name)
        );
        if !c.pass {
            let _ = write!(
                xml,
                "<failure message=\"{}\">{}</failure>",
                xml_escape(c.message),
                xml_escape(c.detail)
            );
        }
        if let Some(out) = c.output {
            let _ = write!(xml, "<system-out>{}</system-out>", xml_escape(out));
        }
        xml.push_str("</testcase>\n");
    }
    xml.push_str("</testsuite>\n");
    xml
}

/// Write `report-<stem>.json` (`report`, pretty) and `junit-<stem>.xml`
/// into `dir`.
pub fn write(dir: &Path, stem: &str, report: &impl Serialize, junit: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(format!("report-{stem}.json")),
        serde_json::to_vec_pretty(report)?,
    )?;
    std::fs::write(dir.join(format!("junit-{stem}.xml")), junit)?;
    Ok(())
}

/// A readable table: a header of `(title, width)` columns, then `rows`;
/// the last column takes what is left of the line.
pub fn table(columns: &[(&str, usize)], rows: &[Vec<String>]) -> String {
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            match columns.get(i) {
                Some((_, w)) if i + 1 < columns.len() => {
                    let _ = write!(out, "{cell:<w$} ");
                }
                _ => out.push_str(cell),
            }
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(&mut columns.iter().map(|(t, _)| *t));
    for r in rows {
        out += &line(&mut r.iter().map(String::as_str));
    }
    out
}

/// `PASS` or `FAIL`.
pub fn verdict_word(pass: bool) -> String {
    if pass { "PASS" } else { "FAIL" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_counts_and_escapes() {
        let cases = [
            Case {
                name: "a<b",
                pass: true,
                message: "",
                detail: "",
                output: Some("said \"hi\" & left"),
            },
            Case {
                name: "c",
                pass: false,
                message: "exit status 3, expected 0",
                detail: "<oops>",
                output: None,
            },
        ];
        let xml = junit("suite", "k.trixie", &cases);
        assert!(xml.contains("tests=\"2\" failures=\"1\""), "{xml}");
        assert!(xml.contains("name=\"a&lt;b\""), "{xml}");
        assert!(xml.contains("<system-out>said &quot;hi&quot; &amp; left</system-out>"));
        assert!(
            xml.contains("<failure message=\"exit status 3, expected 0\">&lt;oops&gt;</failure>")
        );
    }

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &[("scenario", 6), ("verdict", 7), ("observed", 0)],
            &[vec!["one".into(), verdict_word(true), "as expected".into()]],
        );
        assert_eq!(t, "scenario verdict observed\none    PASS    as expected\n");
    }
}
