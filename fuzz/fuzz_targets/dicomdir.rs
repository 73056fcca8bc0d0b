//! Hostile bytes as a DICOMDIR, walked to the files its records reference in a media folder
//! (made once per process under the temporary folder).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use fracture_fuzz::driver;
use libfuzzer_sys::fuzz_target;

fn media() -> &'static PathBuf {
    static MEDIA: OnceLock<PathBuf> = OnceLock::new();
    MEDIA.get_or_init(|| {
        let root =
            std::env::temp_dir().join(format!("fracture-fuzz-dicomdir-{}", std::process::id()));
        driver::make_media(&root)
    })
}

fuzz_target!(|data: &[u8]| {
    fracture_fuzz::count_only_escaping_panics();
    let media = media();
    driver::on_worker_stack(|| driver::dicomdir(media, data))
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
});
