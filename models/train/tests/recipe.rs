//! Member recipes: a TOML file, command-line flags over it, and what is refused.

use fracture_models::drn::{Arch, Pooling};
use fracture_models::manifest::Input;
use fracture_train::trainer::RecipeFlags;
use fracture_train::{Recipe, TrainOptions};

#[test]
fn flags_override_the_file() -> Result<(), Box<dyn std::error::Error>> {
    let file = "name = \"m1\"\narch = \"drn_d_22\"\ninput = \"raw\"\ninput_size = 256\n";
    let r = Recipe::with_flags(Some(file), &RecipeFlags::default())?;
    assert_eq!(
        (r.arch, r.input, r.map_head, r.pooling),
        (Arch::DrnD22, Input::Raw, false, Pooling::Avg)
    );
    let r = Recipe::with_flags(
        Some(file),
        &RecipeFlags {
            input: Some(Input::Both),
            attention: true,
            pooling: Some(Pooling::Spp),
            channels: Some([8, 8, 16, 16, 32, 32, 32, 32]),
            input_size: Some(128),
            ..Default::default()
        },
    )?;
    assert_eq!(
        (r.input, r.attention, r.pooling, r.input_size),
        (Input::Both, true, Pooling::Spp, 128)
    );
    assert_eq!(r.channels, [8, 8, 16, 16, 32, 32, 32, 32]);
    // The paper's settings follow the member: batch 32 and 10:1 with attention.
    let o = TrainOptions::paper(&r, 1);
    assert_eq!((o.batch, o.loss.localisation), (32, 10.0));
    // The shipped demo recipes parse.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/recipes");
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        Recipe::from_toml(&std::fs::read_to_string(&path)?)?;
    }
    Ok(())
}

#[test]
fn incomplete_or_invalid_recipes_are_refused() {
    let err = |file: Option<&str>, flags: RecipeFlags| {
        Recipe::with_flags(file, &flags)
            .expect_err("refused")
            .to_string()
    };
    let e = err(
        None,
        RecipeFlags {
            name: Some("x".into()),
            ..Default::default()
        },
    );
    assert!(e.contains("arch") && e.contains("input_size"), "{e}");
    let base = "name = \"m\"\narch = \"drn_c_26\"\ninput = \"lcn\"\n";
    assert!(err(
        Some(&format!("{base}input_size = 250\n")),
        RecipeFlags::default()
    )
    .contains("multiple of 8"));
    assert!(err(
        Some(&format!("{base}input_size = 64\ndropout = 1\n")),
        RecipeFlags::default()
    )
    .contains("dropout"));
    assert!(err(
        Some(&format!("{base}input_size = 64\n")),
        RecipeFlags {
            name: Some("a/b".into()),
            ..Default::default()
        }
    )
    .contains("name"));
}
