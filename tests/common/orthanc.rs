//! A real PACS for the export tests: Orthanc on loopback, started by `scripts/orthanc.sh` (which
//! stops it and removes its folder when the test process ends), asked through its REST API.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One Orthanc, in its own folder. Its ports are chosen when it is made, so a pipeline can be
/// pointed at it before it runs (a PACS that is down at first). Stopped when dropped (before a
/// temporary folder holding it goes, taking the pid file the script's watchdog would need).
pub struct Orthanc {
    pub dir: PathBuf,
    /// Its DICOM port (AE title ORTHANC).
    pub dicom_port: u16,
    http_port: u16,
}

impl Orthanc {
    /// Reserves the ports (the script keeps them when they are still free at start).
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let (http_port, mut dicom_port) =
            (super::pipeline::free_port(), super::pipeline::free_port());
        while dicom_port == http_port {
            dicom_port = super::pipeline::free_port();
        }
        std::fs::write(dir.join("http-port"), format!("{http_port}\n")).unwrap();
        std::fs::write(dir.join("dicom-port"), format!("{dicom_port}\n")).unwrap();
        Self {
            dir: dir.to_path_buf(),
            dicom_port,
            http_port,
        }
    }

    /// Starts it and waits until its REST API answers.
    pub fn start(&self) {
        let out = Command::new("bash")
            .arg(super::pipeline::repo().join("scripts/orthanc.sh"))
            .arg("start")
            .arg(&self.dir)
            .args(["--watch-pid", &std::process::id().to_string()])
            .arg("--remove-on-exit")
            .output()
            .expect("run scripts/orthanc.sh");
        assert!(
            out.status.success(),
            "scripts/orthanc.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout);
        assert!(
            url.trim_end()
                .ends_with(&format!("127.0.0.1:{}/dicom-web", self.http_port)),
            "Orthanc did not keep the ports chosen for it: {url}"
        );
        let dicom: u16 = std::fs::read_to_string(self.dir.join("dicom-port"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(dicom, self.dicom_port, "Orthanc's DICOM port moved");
    }

    /// Whether its REST API answers.
    pub fn is_up(&self) -> bool {
        Command::new("curl")
            .args(["-sS", "-f", "--max-time", "5"])
            .arg(format!("http://127.0.0.1:{}/system", self.http_port))
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// The `AE@host:port` the exporter sends to.
    pub fn pacs(&self) -> String {
        format!("ORTHANC@127.0.0.1:{}", self.dicom_port)
    }

    fn curl(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("curl")
            .args(["-sS", "-f", "--max-time", "60"])
            .args(args)
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "Orthanc REST {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// GET `path` of the REST API, as JSON.
    pub fn get(&self, path: &str) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}{path}", self.http_port);
        serde_json::from_slice(&self.curl(&[&url])).expect("Orthanc answers JSON")
    }

    /// Every instance Orthanc holds (its own IDs).
    pub fn instances(&self) -> Vec<String> {
        serde_json::from_value(self.get("/instances")).unwrap()
    }

    /// The Orthanc IDs of the studies with this StudyInstanceUID.
    pub fn studies_with_uid(&self, uid: &str) -> Vec<String> {
        let url = format!("http://127.0.0.1:{}/tools/find", self.http_port);
        let query = serde_json::json!({"Level": "Study", "Query": {"StudyInstanceUID": uid}});
        serde_json::from_slice(&self.curl(&[
            "-X",
            "POST",
            "--data-binary",
            &query.to_string(),
            &url,
        ]))
        .unwrap()
    }

    /// One instance as the Part 10 file Orthanc stored.
    pub fn file(&self, id: &str) -> dicom_object::DefaultDicomObject {
        let url = format!("http://127.0.0.1:{}/instances/{id}/file", self.http_port);
        let path = self.dir.join(format!("{id}.dcm"));
        self.curl(&["-o", path.to_str().unwrap(), &url]);
        let obj = dicom_object::open_file(&path).expect("Orthanc's copy parses");
        let _ = std::fs::remove_file(&path);
        obj
    }
}

impl Drop for Orthanc {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(super::pipeline::repo().join("scripts/orthanc.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}
