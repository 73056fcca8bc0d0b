//! Calibration on synthetic scores and maps, where the right thresholds are known exactly.

use fracture_models::Manifest;
use fracture_shared::messages::Geometry;
use fracture_train::calibrate::{calibrate, score_threshold, to_toml, CalibrateOptions};
use fracture_train::{Label, ScoredRadiograph};

#[test]
fn the_score_threshold_is_the_largest_that_reaches_the_target() {
    let pos = [0.9f32, 0.8, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2];
    // 92.5% of 10 needs all 10: the smallest score.
    assert_eq!(score_threshold(&pos, 0.925), Some(0.2));
    assert_eq!(score_threshold(&pos, 0.8), Some(0.4));
    // Ties: on or above counts, so 0.8 already holds 4 of 10 >= 30%; 0.9 holds only 1.
    assert_eq!(score_threshold(&pos, 0.3), Some(0.8));
    assert_eq!(score_threshold(&pos, 0.4), Some(0.8));
    assert_eq!(score_threshold(&pos, 0.41), Some(0.7));
    assert_eq!(score_threshold(&[], 0.925), None);
    // 0.925 x 40 = 37 exactly (not 38, as 37.000000000000004 would round up to).
    let forty: Vec<f32> = (1..=40).map(|i| i as f32 / 40.0).collect();
    let t = score_threshold(&forty, 0.925).expect("a threshold");
    assert_eq!(t, 4.0 / 40.0);
    assert_eq!(forty.iter().filter(|&&s| s >= t).count(), 37);
}

fn geometry() -> Geometry {
    Geometry {
        original_width: 64,
        original_height: 64,
        crop: [0, 0, 64, 64],
        scale: 1.0,
        size: 64,
    }
}

/// An 8 x 8 map: 0.9 on cells (1,1)-(2,1), 0.62 on (5,5)-(5,6), 0.1 elsewhere.
fn two_fracture_map() -> Vec<f32> {
    let mut m = vec![0.1f32; 64];
    for (x, y, v) in [(1, 1, 0.9), (2, 1, 0.9), (5, 5, 0.62), (5, 6, 0.62)] {
        m[y * 8 + x] = v;
    }
    m
}

#[test]
fn regions_get_their_own_thresholds_or_fall_back_by_name() -> Result<(), Box<dyn std::error::Error>>
{
    let mut preds = Vec::new();
    let mut labels = Vec::new();
    let mut add = |uid: String, region: &str, score: f32, fracture: bool| {
        let boxes = if fracture {
            vec![[8.0, 8.0, 24.0, 16.0], [40.0, 40.0, 48.0, 56.0]]
        } else {
            vec![]
        };
        preds.push(ScoredRadiograph {
            sop_instance_uid: uid.clone(),
            region: region.into(),
            score,
            map: Some(if fracture {
                two_fracture_map()
            } else {
                vec![0.1; 64]
            }),
            map_size: 8,
            geometry: Some(geometry()),
        });
        labels.push(Label {
            sop_instance_uid: uid,
            region: region.into(),
            fracture,
            boxes,
        });
    };
    // Wrist: 20 positives scored 0.05, 0.10, ..., 1.00 and 20 negatives at 0.01.
    for i in 1..=20 {
        add(format!("w{i}"), "wrist", i as f32 / 20.0, true);
        add(format!("wn{i}"), "wrist", 0.01, false);
    }
    // Foot: 3 positives, too few for a threshold of its own.
    for i in 0..3 {
        add(format!("f{i}"), "foot", 0.5, true);
    }
    let opts = CalibrateOptions::default();
    let c = calibrate(&preds, &labels, &opts)?;
    // ceil(0.925 x 20) = 19 of 20 wrist positives: the 19th largest is 0.10.
    assert_eq!(c.thresholds.score.get("wrist"), Some(&0.1));
    assert!(!c.thresholds.score.contains_key("foot"));
    assert_eq!(c.fallback, vec!["foot".to_string()]);
    // Global: 23 positives, ceil(21.275) = 22nd largest of {0.05..1.0, 0.5 x 3} = 0.10.
    assert_eq!(c.thresholds.default_score, 0.1);
    // Both boxes are found at map thresholds up to 0.6; above, only the 0.9 one: the highest
    // threshold with the best recall is 0.6, with no false boxes.
    let wrist_map = *c
        .thresholds
        .map
        .get("wrist")
        .expect("a wrist map threshold");
    assert!((wrist_map - 0.6).abs() < 1e-6, "{wrist_map}");
    let wrist = c
        .regions
        .iter()
        .find(|r| r.region == "wrist")
        .expect("wrist");
    assert_eq!(wrist.box_recall.map(|r| r > 0.94), Some(true), "{wrist:?}");
    assert_eq!(wrist.false_boxes_per_image, Some(0.0));

    // The output is the manifest's [thresholds] table and names the fallback.
    let text = to_toml(&c);
    assert!(text.contains("global thresholds: foot"));
    let manifest = format!(
        "name = \"t\"\nmodel_version = \"t\"\ntrained = false\ninput_size = 64\n\
         model_card = \"c\"\n{text}\n[[members]]\nname = \"m\"\narch = \"drn_d_22\"\n\
         input = \"raw\"\nweights = \"m.safetensors\"\nsha256 = \"{}\"\n",
        "0".repeat(64)
    );
    let m = Manifest::from_toml(&manifest, ".".into())?;
    assert_eq!(m.thresholds, c.thresholds);
    assert_eq!(m.score_threshold("foot"), 0.1);
    Ok(())
}

#[test]
fn scores_without_maps_calibrate_scores_only() -> Result<(), Box<dyn std::error::Error>> {
    let preds: Vec<ScoredRadiograph> = (0..12)
        .map(|i| ScoredRadiograph {
            sop_instance_uid: format!("u{i}"),
            region: String::new(),
            score: i as f32 / 12.0,
            map: None,
            map_size: 0,
            geometry: None,
        })
        .collect();
    let labels: Vec<Label> = (0..14)
        .map(|i| Label {
            sop_instance_uid: format!("u{i}"),
            region: "hip".into(),
            fracture: i % 2 == 0,
            boxes: vec![],
        })
        .collect();
    let c = calibrate(
        &preds,
        &labels,
        &CalibrateOptions {
            min_positives: 5,
            ..Default::default()
        },
    )?;
    assert!(!c.maps && c.thresholds.map.is_empty());
    assert_eq!(c.thresholds.default_map, 0.5);
    // The label's region stands in for the missing one; two labels had no prediction.
    assert!(c.thresholds.score.contains_key("hip"));
    assert_eq!(c.unscored, 2);
    // Positives 0, 2, ..., 10 score 0/12 ... 10/12: all 6 are needed, so the lowest.
    assert_eq!(c.thresholds.default_score, 0.0);
    Ok(())
}
