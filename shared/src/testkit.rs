//! Test support: a real Kafka broker for tests, from `FRACTURE_TEST_KAFKA` or started once per
//! test process by the project's own `scripts/kafka.sh` (which stops it when the process ends).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The repository root (this crate lives in `<root>/shared`).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Starts a server with `scripts/<script> start DIR --watch-pid <this process>` (which stops it
/// when this process ends), unless `env_var` names one; returns the last line it printed, which
/// must start with `expect`.
fn started_once(env_var: &str, script: &str, name: &str, expect: &str) -> Result<String, String> {
    if let Ok(v) = std::env::var(env_var) {
        if !v.trim().is_empty() {
            return Ok(v);
        }
    }
    let dir = std::env::temp_dir().join(format!("fracture-{name}-{}", std::process::id()));
    let script = repo_root().join("scripts").join(script);
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
        .filter(|l| l.starts_with(expect))
        .ok_or_else(|| format!("{} printed no address: {stdout}", script.display()))
}

static BROKER: OnceLock<Result<String, String>> = OnceLock::new();

/// Bootstrap address of a broker for tests. Panics with what to do when none can be had: a test
/// that needs Kafka must not pass without one.
pub fn kafka_brokers() -> String {
    BROKER
        .get_or_init(|| started_once("FRACTURE_TEST_KAFKA", "kafka.sh", "kafka", "127.0.0.1:"))
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
/// process by `scripts/postgres.sh`. Panics with what to do.
pub fn postgres_url() -> String {
    POSTGRES
        .get_or_init(|| started_once("FRACTURE_TEST_POSTGRES", "postgres.sh", "pg", "postgres://"))
        .clone()
        .unwrap_or_else(|e| {
            panic!("no PostgreSQL for this test: {e}\nSet FRACTURE_TEST_POSTGRES=postgres://... or make scripts/postgres.sh work.")
        })
}
