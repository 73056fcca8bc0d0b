//! Reference reads (ground truth) onto `fracture.labels`, pseudonymised with the ingest key so
//! they meet the findings: `fracture labels import`, and a scan given `--labels`.

use std::path::Path;

use fracture_audit::evaluate::{pseudonymise_labels, ReferenceRead};
use fracture_ingest::{read_key, DeidPolicy};
use fracture_shared::bus::{Bus, KafkaBus, OutRecord, Topics};
use fracture_shared::messages::{encode, schema, Label};
use fracture_shared::telemetry;

use crate::config::Config;

/// A reference read as a message on `fracture.labels`.
pub fn label_record(topics: &Topics, r: &ReferenceRead) -> OutRecord {
    let label = Label {
        schema: schema::LABEL.into(),
        sop_instance_uid: r.sop_instance_uid.clone(),
        fracture: r.fracture,
        region: r.region.clone(),
        boxes: vec![],
    };
    OutRecord {
        topic: topics.of::<Label>(),
        key: r.sop_instance_uid.clone(),
        payload: encode(&label),
        headers: vec![],
    }
}

/// `fracture labels import`: pseudonymises the reference reads with the ingest key and
/// publishes them on `fracture.labels` in one transaction.
pub async fn import(config: &Config, file: &Path, out: Option<&Path>) -> anyhow::Result<()> {
    telemetry::init(&config.telemetry);
    let cfg = &config.ingest;
    if cfg.key_file.is_empty() {
        anyhow::bail!(
            "ingest.key_file is not set: labels must be pseudonymised with the same key as ingest"
        );
    }
    let policy = DeidPolicy::new(
        read_key(Path::new(&cfg.key_file))?,
        &cfg.site_code,
        &cfg.uid_root,
    )?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| file.with_extension("pseudonymised.csv"));
    let reads = pseudonymise_labels(file, &out, |u| policy.pseudonymise_uid(u))?;
    let kafka = config.kafka.clone();
    let topics = Topics::new(&kafka.topic_prefix);
    let partitions = kafka.partitions;
    let bus = KafkaBus::new(kafka);
    bus.create_topics(&[topics.of::<Label>()], partitions)
        .await?;
    let mut producer = bus
        .producer(&format!(
            "{}.labels-import.{}",
            topics.prefix,
            std::process::id()
        ))
        .await?;
    let records: Vec<_> = reads.iter().map(|r| label_record(&topics, r)).collect();
    producer.send(records).await?;
    producer.close().await?;
    println!(
        "published {} reference reads on {}; pseudonymised copy: {}",
        reads.len(),
        topics.of::<Label>(),
        out.display()
    );
    Ok(())
}
