//! `multipart/related` bodies (RFC 2387 over RFC 2046), as DICOMweb sends DICOM objects in both
//! directions: media type parameters, and splitting a body held in memory into its parts.

use bytes::Bytes;
use memchr::memmem;

/// A parsed `Content-Type` value: the lowercased `type/subtype` and its parameters (names
/// lowercased, values unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    pub essence: String,
    pub params: Vec<(String, String)>,
}

impl MediaType {
    /// `None` when there is no `type/subtype`.
    pub fn parse(value: &str) -> Option<Self> {
        let mut fields = split_params(value).into_iter();
        let essence = fields.next()?.trim().to_ascii_lowercase();
        if !essence.contains('/') {
            return None;
        }
        let params = fields
            .filter_map(|f| {
                let (name, value) = f.split_once('=')?;
                Some((name.trim().to_ascii_lowercase(), unquote(value.trim())))
            })
            .collect();
        Some(Self { essence, params })
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits on `;` outside double quotes.
fn split_params(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let (mut quoted, mut escaped) = (false, false);
    for c in value.chars() {
        let current = out.last_mut().expect("never empty");
        if escaped {
            current.push(c);
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => {
                current.push(c);
                escaped = true;
            }
            '"' => {
                current.push(c);
                quoted = !quoted;
            }
            ';' if !quoted => out.push(String::new()),
            _ => current.push(c),
        }
    }
    out
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if escaped || c != '\\' {
                    out.push(c);
                    escaped = false;
                } else {
                    escaped = true;
                }
            }
            out
        }
        None => v.to_string(),
    }
}

/// One body part: its headers (names lowercased) and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Part {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn content_type(&self) -> Option<MediaType> {
        self.header("content-type").and_then(MediaType::parse)
    }
}

/// Why a body is not a well-formed multipart body. The text names no content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed multipart body: {0}")]
pub struct MultipartError(pub String);

/// Refuses bodies with absurdly many parts before allocating for them (a study of radiographs
/// has a handful; each part becomes an input with its own answer and, when refused, a dead
/// letter).
pub const MAX_PARTS: usize = 10_000;
/// A part's header block: a few hundred bytes in practice.
pub const MAX_PART_HEADERS: usize = 16 * 1024;

/// Splits `body` into its parts (zero-copy slices). The preamble and epilogue are ignored; a
/// body without its closing delimiter is refused, since its last part may be cut short.
pub fn parse(body: &Bytes, boundary: &str) -> Result<Vec<Part>, MultipartError> {
    if boundary.is_empty() || boundary.len() > 200 {
        return Err(MultipartError(
            "the boundary parameter is missing or longer than 200 characters".into(),
        ));
    }
    let dash = format!("--{boundary}");
    let delimiter = format!("\n--{boundary}");
    let finder = memmem::Finder::new(delimiter.as_bytes());
    let data = &body[..];
    // The first delimiter may open the body (no preamble) or follow a preamble line.
    let mut at = if data.starts_with(dash.as_bytes()) {
        Some(0)
    } else {
        next_delimiter(data, 0, &finder).map(|p| p + 1)
    };
    let mut parts = Vec::new();
    loop {
        let Some(start) = at else {
            return Err(MultipartError(if parts.is_empty() {
                "no delimiter line with the declared boundary".into()
            } else {
                "the closing delimiter is missing (the body may be cut short)".into()
            }));
        };
        let after = start + dash.len();
        if data[after..].starts_with(b"--") {
            return Ok(parts);
        }
        let content_start = match line_end(data, after) {
            Some(e) => e,
            None => return Err(MultipartError("a delimiter line is not terminated".into())),
        };
        let Some(next) = next_delimiter(data, content_start.saturating_sub(2), &finder) else {
            at = None;
            continue;
        };
        // The CRLF (or LF) before the next delimiter belongs to the delimiter.
        let mut content_end = next;
        if content_end > content_start && data[content_end - 1] == b'\r' {
            content_end -= 1;
        }
        let content_end = content_end.max(content_start);
        parts.push(part(body, content_start, content_end)?);
        if parts.len() > MAX_PARTS {
            return Err(MultipartError(format!("more than {MAX_PARTS} parts")));
        }
        if next < start {
            return Err(MultipartError("overlapping delimiters".into()));
        }
        at = Some(next + 1);
    }
}

/// The position of the `\n` of the next `\n--boundary` at or after `from` that is really a
/// delimiter line (followed by `--`, or by optional blanks and a line end).
fn next_delimiter(data: &[u8], from: usize, finder: &memmem::Finder) -> Option<usize> {
    let mut from = from;
    while from < data.len() {
        let p = from + finder.find(&data[from..])?;
        let after = p + finder.needle().len();
        let rest = &data[after..];
        let blanks = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        if rest.starts_with(b"--")
            || rest[blanks..].starts_with(b"\r\n")
            || rest[blanks..].starts_with(b"\n")
        {
            return Some(p);
        }
        from = p + 1;
    }
    None
}

/// The index just past the line end that terminates the delimiter line starting its tail at
/// `from` (transport padding allowed).
fn line_end(data: &[u8], from: usize) -> Option<usize> {
    let rest = &data[from..];
    let blanks = rest
        .iter()
        .take_while(|b| **b == b' ' || **b == b'\t')
        .count();
    if rest[blanks..].starts_with(b"\r\n") {
        Some(from + blanks + 2)
    } else if rest[blanks..].starts_with(b"\n") {
        Some(from + blanks + 1)
    } else {
        None
    }
}

fn part(body: &Bytes, start: usize, end: usize) -> Result<Part, MultipartError> {
    let data = &body[start..end];
    // Headers end at the first empty line; a part may have none at all. Only the first
    // MAX_PART_HEADERS bytes are searched, so a part of megabytes of "headers" is refused
    // without being scanned or split into lines.
    let head_area = &data[..data.len().min(MAX_PART_HEADERS + 4)];
    let (head_len, content_offset) = if data.is_empty() {
        (0, 0)
    } else if data.starts_with(b"\r\n") {
        (0, 2)
    } else if data.starts_with(b"\n") {
        (0, 1)
    } else if let Some(p) = memmem::find(head_area, b"\r\n\r\n") {
        (p, p + 4)
    } else if let Some(p) = memmem::find(head_area, b"\n\n") {
        (p, p + 2)
    } else if data.len() > MAX_PART_HEADERS {
        return Err(MultipartError(format!(
            "a part's headers run past {MAX_PART_HEADERS} bytes (or it has no empty line after them)"
        )));
    } else {
        return Err(MultipartError(
            "a part has no empty line after its headers".into(),
        ));
    };
    let head = std::str::from_utf8(&data[..head_len])
        .map_err(|_| MultipartError("part headers are not text".into()))?;
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in head.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // A folded header line continues the previous one.
            if let Some(last) = headers.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
                continue;
            }
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| MultipartError("a part header line has no colon".into()))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Part {
        headers,
        body: body.slice(start + content_offset..end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[(&str, &[u8])], boundary: &str) -> Bytes {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for (ct, content) in parts {
            out.extend_from_slice(format!("--{boundary}\r\nContent-Type: {ct}\r\n\r\n").as_bytes());
            out.extend_from_slice(content);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\nepilogue").as_bytes());
        Bytes::from(out)
    }

    #[test]
    fn media_type_parameters_are_unquoted_and_case_folded() {
        let m = MediaType::parse(
            r#"Multipart/Related; type="application/dicom"; Boundary="a;b\"c"; transfer-syntax=*"#,
        )
        .expect("parses");
        assert_eq!(m.essence, "multipart/related");
        assert_eq!(m.param("type"), Some("application/dicom"));
        assert_eq!(m.param("boundary"), Some("a;b\"c"));
        assert_eq!(m.param("transfer-syntax"), Some("*"));
        assert!(MediaType::parse("nonsense").is_none());
    }

    #[test]
    fn parts_keep_binary_content_exactly() {
        // Content that looks like line ends and partial delimiters must survive untouched.
        let a: &[u8] = b"\r\n--b0und\r\nDICM\x00\xff\n\n";
        let b: &[u8] = b"";
        let c: &[u8] = b"--b0undary-not-quite";
        let parts = parse(
            &body(
                &[
                    ("application/dicom", a),
                    ("application/dicom", b),
                    ("text/plain", c),
                ],
                "b0undary",
            ),
            "b0undary",
        )
        .expect("parses");
        assert_eq!(parts.len(), 3);
        assert_eq!(&parts[0].body[..], a);
        assert_eq!(&parts[1].body[..], b);
        assert_eq!(&parts[2].body[..], c);
        assert_eq!(
            parts[2].content_type().map(|m| m.essence),
            Some("text/plain".into())
        );
    }

    #[test]
    fn a_body_cut_short_or_with_another_boundary_is_refused() {
        let whole = body(&[("application/dicom", b"abc")], "xyz");
        let cut = whole.slice(..whole.len() - 14);
        assert!(parse(&cut, "xyz").is_err());
        assert!(parse(&whole, "other").is_err());
        assert!(parse(&whole, "").is_err());
    }

    #[test]
    fn bare_line_feeds_and_parts_without_headers_are_read() {
        let raw = Bytes::from_static(b"--q\n\nhello\n--q\nContent-Type: a/b\n\nworld\n--q--\n");
        let parts = parse(&raw, "q").expect("parses");
        assert_eq!(parts.len(), 2);
        assert_eq!(&parts[0].body[..], b"hello");
        assert!(parts[0].headers.is_empty());
        assert_eq!(&parts[1].body[..], b"world");
    }
}
