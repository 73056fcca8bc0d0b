//! The 80/10/10 split by patient.

use fracture_train::data::{split_by_patient, Part};

#[test]
fn no_patient_is_in_two_sets_and_the_seed_reproduces_it() {
    // 300 radiographs of 97 patients, 3 or 4 each, interleaved.
    let ids: Vec<String> = (0..300u64).map(|i| format!("P{}", (i * 37) % 97)).collect();
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let parts = split_by_patient(&refs, 42);
    let mut of = std::collections::HashMap::new();
    for (id, part) in refs.iter().zip(&parts) {
        assert_eq!(
            *of.entry(*id).or_insert(*part),
            *part,
            "{id} is in two sets"
        );
    }
    let count = |p: Part| of.values().filter(|&&v| v == p).count();
    // 97 patients: 10 tuning, 10 validation, 77 training.
    assert_eq!(
        (
            count(Part::Train),
            count(Part::Tuning),
            count(Part::Validation)
        ),
        (77, 10, 10)
    );
    assert_eq!(split_by_patient(&refs, 42), parts);
    assert_ne!(split_by_patient(&refs, 43), parts);
}
