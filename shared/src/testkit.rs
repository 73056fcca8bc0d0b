//! Test support: a real Kafka broker for tests, from `FRACTURE_TEST_KAFKA` or started once per
//! test process by the project's own `scripts/kafka.sh` (which stops it when the process ends).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The repository root (this crate lives in `<root>/shared`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

static BROKER: OnceLock<Result<String, String>> = OnceLock::new();

/// Bootstrap address of a broker for tests. Panics with what to do when none can be had: a test
/// that needs Kafka must not pass without one.
pub fn kafka_brokers() -> String {
    BROKER
        .get_or_init(|| {
            if let Ok(b) = std::env::var("FRACTURE_TEST_KAFKA") {
                if !b.trim().is_empty() {
                    return Ok(b);
                }
            }
            let dir = std::env::temp_dir().join(format!("fracture-kafka-{}", std::process::id()));
            let script = repo_root().join("scripts/kafka.sh");
            let out = Command::new("bash")
                .arg(&script)
                .arg("start")
                .arg(&dir)
                .arg("--watch-pid")
                .arg(std::process::id().to_string())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} start failed: {}",
                    script.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout
                .lines()
                .last()
                .map(|l| l.trim().to_string())
                .filter(|l| l.contains(':'))
                .ok_or_else(|| format!("kafka.sh printed no bootstrap address: {stdout}"))
        })
        .clone()
        .unwrap_or_else(|e| {
            panic!("no Kafka broker for this test: {e}\nSet FRACTURE_TEST_KAFKA=host:port or make scripts/kafka.sh work (Java 17 + Maven).")
        })
}

/// A topic prefix no other test uses, so tests never see each other's data.
pub fn unique_prefix(name: &str) -> String {
    use rand::Rng;
    format!(
        "t{}-{}-{:08x}",
        std::process::id(),
        name,
        rand::rng().random::<u32>()
    )
}

static POSTGRES: OnceLock<Result<String, String>> = OnceLock::new();

/// A PostgreSQL URL for tests, from `FRACTURE_TEST_POSTGRES` or a server started once per test
/// process by `scripts/postgres.sh` (stopped when the process ends). Panics with what to do.
pub fn postgres_url() -> String {
    POSTGRES
        .get_or_init(|| {
            if let Ok(u) = std::env::var("FRACTURE_TEST_POSTGRES") {
                if !u.trim().is_empty() {
                    return Ok(u);
                }
            }
            let dir = std::env::temp_dir().join(format!("fracture-pg-{}", std::process::id()));
            let script = repo_root().join("scripts/postgres.sh");
            let out = Command::new("bash")
                .arg(&script)
                .arg("start")
                .arg(&dir)
                .arg("--watch-pid")
                .arg(std::process::id().to_string())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if !out.status.success() {
                return Err(format!("{} start failed: {}", script.display(), String::from_utf8_lossy(&out.stderr)));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            stdout
                .lines()
                .last()
                .map(|l| l.trim().to_string())
                .filter(|l| l.starts_with("postgres://"))
                .ok_or_else(|| format!("postgres.sh printed no URL: {stdout}"))
        })
        .clone()
        .unwrap_or_else(|e| panic!("no PostgreSQL for this test: {e}\nSet FRACTURE_TEST_POSTGRES=postgres://... or make scripts/postgres.sh work."))
}
