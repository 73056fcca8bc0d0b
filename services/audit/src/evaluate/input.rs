//! Reading the evaluation inputs: `fracture scan` findings (JSONL) and reference labels (CSV).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;

use super::EvalError;

/// The fracture-type indicator columns the labels may carry, in the paper's order.
pub(crate) const INDICATORS: [&str; 5] = [
    "callus",
    "displacement",
    "angulation",
    "comminution",
    "lucent_line",
];

/// One line of `findings.jsonl`.
#[derive(Debug, Clone)]
pub(crate) struct Prediction {
    pub uid: String,
    /// `None` when the finding has no region (or an empty one): the label's is used instead.
    pub region: Option<String>,
    pub score: f64,
    pub call: bool,
}

/// One radiograph's reference standard, gathered from all of its CSV rows.
#[derive(Debug, Clone)]
pub(crate) struct Label {
    pub region: String,
    pub fracture: bool,
    /// `None` when the file has no `disagreement` column.
    pub disagreement: Option<bool>,
    /// Per [`INDICATORS`]: present on any of the radiograph's rows (`false` when the column is absent).
    pub indicators: [bool; 5],
}

#[derive(Debug, Default)]
pub(crate) struct Labels {
    pub by_uid: HashMap<String, Label>,
    pub has_disagreement: bool,
    pub has_indicator: [bool; 5],
}

/// The fields we read; serde ignores the rest (`input`, `boxes`, `model_version`...).
#[derive(serde::Deserialize)]
struct RawFinding {
    sop_instance_uid: String,
    #[serde(default)]
    region: Option<String>,
    score: f64,
    fracture: bool,
}

fn parse_error(path: &Path, line: usize, message: impl Into<String>) -> EvalError {
    EvalError::Parse {
        path: path.to_path_buf(),
        line,
        message: message.into(),
    }
}

fn io_error(path: &Path, source: std::io::Error) -> EvalError {
    EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads predictions in file order. A radiograph scored twice is an error rather than a silent
/// pick, since counting it twice (or choosing one) would bias every metric.
pub(crate) fn read_predictions(path: &Path) -> Result<Vec<Prediction>, EvalError> {
    let file = std::fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut out = Vec::new();
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let lineno = i + 1;
        let line = line.map_err(|e| io_error(path, e))?;
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let raw: RawFinding = serde_json::from_str(text).map_err(|e| {
            // serde_json says "at line 1 column N" of the one-line document; the file line is ours.
            let mut msg = e.to_string();
            if let Some(at) = msg.rfind(" at line ") {
                msg.truncate(at);
            }
            parse_error(
                path,
                lineno,
                format!(
                    "not a finding object ({msg}, column {}); each line needs sop_instance_uid, region, score and fracture",
                    e.column()
                ),
            )
        })?;
        let uid = raw.sop_instance_uid.trim().to_string();
        if uid.is_empty() {
            return Err(parse_error(path, lineno, "sop_instance_uid is empty"));
        }
        if !raw.score.is_finite() {
            return Err(parse_error(path, lineno, "score is not a finite number"));
        }
        if let Some(first) = first_line.insert(uid.clone(), lineno) {
            return Err(parse_error(
                path,
                lineno,
                format!(
                    "sop_instance_uid {uid} was already scored on line {first}; keep one finding per radiograph (one model version per file)"
                ),
            ));
        }
        let region = raw
            .region
            .map(|r| r.trim().to_string())
            .filter(|r| !r.is_empty());
        out.push(Prediction {
            uid,
            region,
            score: raw.score,
            call: raw.fracture,
        });
    }
    Ok(out)
}

/// A CSV record: the 1-based line it starts on and its fields.
pub(crate) type Record = (usize, Vec<String>);

/// Splits CSV text into records (RFC 4180: commas, double quotes, `""` inside quotes, quoted
/// newlines), each with the 1-based line it starts on. Blank lines are skipped.
pub(crate) fn parse_csv(text: &str) -> Result<Vec<Record>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text); // spreadsheet exports start with a BOM
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut line = 1usize;
    let mut record_line = 1usize;
    let mut chars = text.chars().peekable();
    // Whether the current field was quoted, so that `"",` is kept as an empty field of a record.
    let mut quoted = false;
    loop {
        let Some(c) = chars.next() else {
            if !fields.is_empty() || !field.is_empty() || quoted {
                fields.push(std::mem::take(&mut field));
                records.push((record_line, std::mem::take(&mut fields)));
            }
            break;
        };
        match c {
            '"' if field.is_empty() && !quoted => {
                quoted = true;
                let start = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err((start, "a quoted field is never closed".to_string()));
                        }
                        Some('"') => {
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                field.push('"');
                            } else {
                                break;
                            }
                        }
                        Some(ch) => {
                            if ch == '\n' {
                                line += 1;
                            }
                            field.push(ch);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') | Some('\r') => {}
                    Some(other) => {
                        return Err((
                            line,
                            format!("unexpected {other:?} after a closing quote; double a quote inside a quoted field (\"\")"),
                        ));
                    }
                }
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if !fields.is_empty() || !field.is_empty() || quoted {
                    fields.push(std::mem::take(&mut field));
                    records.push((record_line, std::mem::take(&mut fields)));
                }
                quoted = false;
                line += 1;
                record_line = line;
            }
            _ => field.push(c),
        }
    }
    Ok(records)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

/// Reads the labels: one row per box, so a positive radiograph may span several rows; they must
/// agree on the radiograph-level fields.
pub(crate) fn read_labels(path: &Path) -> Result<Labels, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
    let records = parse_csv(&text).map_err(|(line, msg)| parse_error(path, line, msg))?;
    let mut records = records.into_iter();
    let Some((header_line, header)) = records.next() else {
        return Err(EvalError::File {
            path: path.to_path_buf(),
            message:
                "is empty; expected a header line sop_instance_uid,region,fracture,x0,y0,x1,y1"
                    .into(),
        });
    };
    let names: Vec<String> = header
        .iter()
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    let mut column: HashMap<&str, usize> = HashMap::new();
    for (i, name) in names.iter().enumerate() {
        if !name.is_empty() && column.insert(name.as_str(), i).is_some() {
            return Err(parse_error(
                path,
                header_line,
                format!("column {name:?} appears twice in the header"),
            ));
        }
    }
    let required = |name: &str| {
        column.get(name).copied().ok_or_else(|| {
            parse_error(
                path,
                header_line,
                format!(
                    "the header has no {name:?} column; expected sop_instance_uid,region,fracture,x0,y0,x1,y1 (found {})",
                    names.join(",")
                ),
            )
        })
    };
    let c_uid = required("sop_instance_uid")?;
    let c_region = required("region")?;
    let c_fracture = required("fracture")?;
    let c_boxes: Vec<(usize, &str)> = ["x0", "y0", "x1", "y1"]
        .iter()
        .filter_map(|n| column.get(n).map(|&i| (i, *n)))
        .collect();
    let c_disagreement = column.get("disagreement").copied();
    let c_indicators: [Option<usize>; 5] = INDICATORS.map(|n| column.get(n).copied());

    let mut labels = Labels {
        by_uid: HashMap::new(),
        has_disagreement: c_disagreement.is_some(),
        has_indicator: c_indicators.map(|c| c.is_some()),
    };
    // The line each radiograph was first seen on, to name both lines when rows disagree.
    let mut first_line: HashMap<String, usize> = HashMap::new();
    for (line, fields) in records {
        if fields.len() != names.len() {
            return Err(parse_error(
                path,
                line,
                format!(
                    "has {} fields but the header has {}; quote fields that contain commas",
                    fields.len(),
                    names.len()
                ),
            ));
        }
        let uid = fields[c_uid].trim();
        if uid.is_empty() {
            return Err(parse_error(path, line, "sop_instance_uid is empty"));
        }
        let region = fields[c_region].trim().to_string();
        let flag = |col: usize, name: &str| {
            parse_bool(&fields[col]).ok_or_else(|| {
                parse_error(
                    path,
                    line,
                    format!("{name} is {:?}; expected 1, 0, true or false", fields[col]),
                )
            })
        };
        let fracture = flag(c_fracture, "fracture")?;
        let disagreement = c_disagreement
            .map(|c| flag(c, "disagreement"))
            .transpose()?;
        let mut indicators = [false; 5];
        for (k, col) in c_indicators.iter().enumerate() {
            if let Some(col) = *col {
                // An empty indicator cell means "not recorded": counted as absent.
                if !fields[col].trim().is_empty() {
                    indicators[k] = flag(col, INDICATORS[k])?;
                }
            }
        }
        let mut filled = 0;
        for &(col, name) in &c_boxes {
            let v = fields[col].trim();
            if v.is_empty() {
                continue;
            }
            filled += 1;
            if v.parse::<f64>().map(|x| !x.is_finite()).unwrap_or(true) {
                return Err(parse_error(
                    path,
                    line,
                    format!("{name} is {v:?}; expected a number or an empty field"),
                ));
            }
        }
        if filled > 0 && filled < c_boxes.len() {
            return Err(parse_error(
                path,
                line,
                "the box is partly filled; give all of x0,y0,x1,y1 or none",
            ));
        }
        if filled > 0 && !fracture {
            return Err(parse_error(
                path,
                line,
                "fracture is 0 but the row has a box; negatives have empty box fields",
            ));
        }
        match labels.by_uid.get_mut(uid) {
            None => {
                first_line.insert(uid.to_string(), line);
                labels.by_uid.insert(
                    uid.to_string(),
                    Label {
                        region,
                        fracture,
                        disagreement,
                        indicators,
                    },
                );
            }
            Some(prev) => {
                let first = first_line.get(uid).copied().unwrap_or(0);
                let conflict = |what: &str| {
                    parse_error(
                        path,
                        line,
                        format!("{what} differs from line {first} for the same sop_instance_uid {uid}; one radiograph has one {what}"),
                    )
                };
                if prev.fracture != fracture {
                    return Err(conflict("fracture"));
                }
                if prev.region != region {
                    return Err(conflict("region"));
                }
                if prev.disagreement != disagreement {
                    return Err(conflict("disagreement"));
                }
                // Indicators are recorded per box: the radiograph has one if any of its boxes has.
                for (p, n) in prev.indicators.iter_mut().zip(indicators) {
                    *p |= n;
                }
            }
        }
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(text: &str) -> Vec<Record> {
        parse_csv(text).unwrap()
    }

    #[test]
    fn csv_quotes_newlines_and_blank_lines() {
        let r = rec("a,b,c\r\n\"x, y\",\"he said \"\"hi\"\"\",\n\n\"multi\nline\",2,3\n");
        assert_eq!(r.len(), 3);
        assert_eq!(r[0], (1, vec!["a".into(), "b".into(), "c".into()]));
        assert_eq!(
            r[1],
            (
                2,
                vec!["x, y".into(), "he said \"hi\"".into(), String::new()]
            )
        );
        assert_eq!(
            r[2],
            (4, vec!["multi\nline".into(), "2".into(), "3".into()])
        );
    }

    #[test]
    fn csv_no_trailing_newline_and_bom() {
        let r = rec("\u{feff}a,b\n1,2");
        assert_eq!(
            r,
            vec![
                (1, vec!["a".into(), "b".into()]),
                (2, vec!["1".into(), "2".into()])
            ]
        );
    }

    #[test]
    fn csv_errors_name_the_line() {
        assert_eq!(parse_csv("a\n\"open\n\n").unwrap_err().0, 2);
        assert_eq!(parse_csv("a,b\n1,2\n\"x\"y,3\n").unwrap_err().0, 3);
    }

    #[test]
    fn bools() {
        assert_eq!(parse_bool(" TRUE "), Some(true));
        assert_eq!(parse_bool("0"), Some(false));
        assert_eq!(parse_bool("yes"), None);
        assert_eq!(parse_bool(""), None);
    }
}

/// One radiograph's reference read, as the sink stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReferenceRead {
    pub sop_instance_uid: String,
    pub region: Option<String>,
    pub fracture: bool,
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Rewrites a labels CSV with its `sop_instance_uid` column mapped by `pseudonymise` (the
/// hospital's file is keyed by original UIDs; ours must be keyed like the findings), keeping
/// every other column, and returns one reference read per radiograph (validated like
/// [`read_labels`] validates them).
pub fn pseudonymise_labels(
    input: &Path,
    output: &Path,
    pseudonymise: impl Fn(&str) -> String,
) -> Result<Vec<ReferenceRead>, EvalError> {
    let text = std::fs::read_to_string(input).map_err(|e| io_error(input, e))?;
    let records = parse_csv(&text).map_err(|(line, msg)| parse_error(input, line, msg))?;
    let Some((header_line, header)) = records.first() else {
        return Err(EvalError::File {
            path: input.to_path_buf(),
            message:
                "is empty; expected a header line sop_instance_uid,region,fracture,x0,y0,x1,y1"
                    .into(),
        });
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
    };
    let c_uid = col("sop_instance_uid").ok_or_else(|| {
        parse_error(
            input,
            *header_line,
            "the header has no sop_instance_uid column",
        )
    })?;
    let mut out = String::new();
    out.push_str(
        &header
            .iter()
            .map(|f| csv_field(f))
            .collect::<Vec<_>>()
            .join(","),
    );
    out.push('\n');
    for (_, fields) in records.iter().skip(1) {
        let row: Vec<String> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i == c_uid && !f.trim().is_empty() {
                    pseudonymise(f.trim())
                } else {
                    f.clone()
                }
            })
            .collect();
        out.push_str(
            &row.iter()
                .map(|f| csv_field(f))
                .collect::<Vec<_>>()
                .join(","),
        );
        out.push('\n');
    }
    if let Some(dir) = output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io_error(output, e))?;
    }
    std::fs::write(output, out).map_err(|e| io_error(output, e))?;
    // Validate and gather what was written with the same reader `evaluate` uses.
    let labels = read_labels(output)?;
    let mut reads: Vec<ReferenceRead> = labels
        .by_uid
        .into_iter()
        .map(|(uid, l)| ReferenceRead {
            sop_instance_uid: uid,
            region: Some(l.region).filter(|r| !r.is_empty() && r != "unknown"),
            fracture: l.fracture,
        })
        .collect();
    reads.sort_by(|a, b| a.sop_instance_uid.cmp(&b.sop_instance_uid));
    Ok(reads)
}
