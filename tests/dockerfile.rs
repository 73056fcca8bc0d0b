//! The Dockerfile read as BuildKit reads it: a line ending in `\` continues on the next line that
//! is neither blank nor a comment, so a stray `\` before a blank line swallows the next
//! instruction (it once made `FROM … AS runtime` part of the builder's last `RUN`, and the build
//! failed at the very end of a long cargo build). No container engine is needed to read it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const KEYWORDS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "ONBUILD",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
    "RUN",
];

/// (keyword, arguments, physical lines) of each instruction.
fn instructions(text: &str) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        let continuing = current.is_some();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            // Parser directives and comments outside an instruction; skipped inside one too.
            continue;
        }
        let (mut joined, mut lines) = current.take().unwrap_or_default();
        if !continuing {
            joined.clear();
        }
        lines.push(trimmed.to_string());
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                joined.push_str(head);
                joined.push(' ');
                current = Some((joined, lines));
            }
            None => {
                joined.push_str(trimmed);
                let (keyword, args) = joined
                    .split_once(char::is_whitespace)
                    .unwrap_or((&joined, ""));
                out.push((keyword.to_ascii_uppercase(), args.trim().to_string(), lines));
            }
        }
    }
    assert!(
        current.is_none(),
        "the Dockerfile ends inside a continued line"
    );
    out
}

#[test]
fn every_instruction_stands_on_its_own_and_the_image_carries_its_models() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("Dockerfile")).expect("Dockerfile");
    let ins = instructions(&text);
    for (keyword, _, lines) in &ins {
        assert!(
            KEYWORDS.contains(&keyword.as_str()),
            "unknown instruction {keyword}"
        );
        // A continuation line that starts with an instruction keyword is one that was swallowed.
        for l in &lines[1..] {
            let first = l.split_whitespace().next().unwrap_or("");
            assert!(
                !(KEYWORDS.contains(&first) && first.chars().all(|c| c.is_ascii_uppercase())),
                "{keyword} swallows the line {l:?}: a `\\` before a blank line continues into it"
            );
        }
    }
    let stages: Vec<&str> = ins
        .iter()
        .filter(|(k, _, _)| k == "FROM")
        .map(|(_, a, _)| a.rsplit(' ').next().unwrap_or(""))
        .collect();
    assert_eq!(stages, ["builder", "runtime"], "the two stages");
    let runtime = ins.iter().rposition(|(k, _, _)| k == "FROM").unwrap();
    let tail = &ins[runtime..];
    assert!(
        tail.iter()
            .any(|(k, a, _)| k == "COPY" && a.starts_with("--from=builder")),
        "the runtime stage takes the build's output"
    );
    assert!(
        tail.iter()
            .any(|(k, a, _)| k == "ENTRYPOINT" && a.contains("\"fracture\"")),
        "the image runs fracture"
    );
    // The manifest the image serves by default is among the models the builder copies in.
    let manifest = tail
        .iter()
        .find_map(|(k, a, _)| {
            (k == "ENV")
                .then(|| a.strip_prefix("FRACTURE__MODEL__MANIFEST="))
                .flatten()
        })
        .expect("the image names its default manifest");
    let model = manifest
        .strip_prefix("/usr/share/fracture/")
        .and_then(|m| m.strip_suffix("/ensemble.toml"))
        .expect("a manifest under /usr/share/fracture/models");
    assert!(root.join(model).join("ensemble.toml").is_file(), "{model}");
    let build = ins
        .iter()
        .find(|(k, a, _)| k == "RUN" && a.contains("cargo build"))
        .expect("the builder's RUN");
    assert!(
        build.1.contains(&format!("cp -r {model} "))
            || build.1.split(';').any(|cmd| {
                cmd.trim().starts_with("cp -r ")
                    && cmd.split_whitespace().any(|w| w == model)
                    && cmd.trim_end().ends_with("/out/usr/share/fracture/models/")
            }),
        "the builder copies {model} into /usr/share/fracture/models"
    );
}

/// BuildKit's own `docker build --check` (lint rules, instruction parsing, the stage graph),
/// through `container-check dockerfile`: (warnings as `rule: detail`, build error).
fn buildkit_check(dockerfile: &Path) -> (Vec<String>, Option<String>) {
    let out = Command::new(common::container_check())
        .arg("dockerfile")
        .arg(dockerfile)
        .output()
        .expect("run container-check dockerfile");
    assert!(
        out.status.success(),
        "container-check dockerfile: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let warnings = v["warnings"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|w| format!("{}: {}", w["ruleName"], w["detail"]))
        .collect();
    let error = v["buildError"]["message"].as_str().map(str::to_string);
    (warnings, error)
}

#[test]
fn buildkit_finds_nothing_to_say_about_the_dockerfile() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (warnings, error) = buildkit_check(&root.join("Dockerfile"));
    assert_eq!(error, None, "BuildKit cannot build the Dockerfile");
    assert!(warnings.is_empty(), "BuildKit's checks: {warnings:?}");

    // The same check on the bug this file once had (a `\` before a blank line at the end of the
    // builder's last RUN) reports it, so a clean result above means something.
    let text = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let runtime = text.find("\nFROM ").and_then(|first| {
        text[first + 1..]
            .find("\nFROM ")
            .map(|second| first + 1 + second)
    });
    let runtime = runtime.expect("a second stage");
    let before = text[..runtime].trim_end();
    let broken = format!("{before} \\\n\n{}", &text[runtime + 1..]);
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("Dockerfile");
    std::fs::write(&file, broken).unwrap();
    let (warnings, error) = buildkit_check(&file);
    assert!(
        warnings.iter().any(|w| w.contains("NoEmptyContinuation")),
        "{warnings:?}"
    );
    assert!(error.is_some(), "the swallowed FROM goes unnoticed");
}
