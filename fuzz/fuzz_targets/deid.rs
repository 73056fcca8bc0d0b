//! Hostile bytes as a DICOM file through the gate, the parser, pixel decoding,
//! de-identification (pass-through and whole-file) and writing, each copy read back.
#![no_main]

use fracture_fuzz::driver;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fracture_fuzz::count_only_escaping_panics();
    let findings = driver::on_worker_stack(|| driver::deid(data))
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    fracture_fuzz::keep_findings("deid", data, &findings);
});
