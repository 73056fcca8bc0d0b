//! The pre-processing transform on images whose right answer is known: synthetic ones built
//! here, and the real fixtures (RG3_UNCR.dcm, cat.dcm) decoded as the preprocess stage does.

use std::path::PathBuf;
use std::process::Command;

use fracture_models::{transform, TransformConfig, Transformed};
use fracture_shared::pixels;

fn cfg(size: usize) -> TransformConfig {
    TransformConfig {
        size,
        ..TransformConfig::default()
    }
}

/// A `w x h` black image with the rectangle `[x0, y0, x1, y1)` at `value`.
fn padded_rect(w: usize, h: usize, rect: [usize; 4], value: f32) -> Vec<f32> {
    let mut img = vec![0f32; w * h];
    for y in rect[1]..rect[3] {
        img[y * w + rect[0]..y * w + rect[2]].fill(value);
    }
    img
}

/// A textured "limb": values in [0.3, 0.9] that vary from pixel to pixel, so every resampling
/// and normalisation error shows.
fn textured(w: usize, h: usize, rect: [usize; 4]) -> Vec<f32> {
    let mut img = vec![0f32; w * h];
    for y in rect[1]..rect[3] {
        for x in rect[0]..rect[2] {
            let (fx, fy) = (x as f32, y as f32);
            img[y * w + x] = 0.6
                + 0.2 * (fx / 13.0).sin() * (fy / 29.0).cos()
                + 0.1 * ((x * 7 + y * 13) % 11) as f32 / 11.0;
        }
    }
    img
}

/// Width and height of the non-zero part of the raw canvas (the rest is the zero padding).
fn content_extent(t: &Transformed) -> (usize, usize) {
    let n = t.size;
    let rows = (0..n)
        .filter(|&y| t.raw[y * n..(y + 1) * n].iter().any(|&v| v != 0.0))
        .count();
    let cols = (0..n)
        .filter(|&x| (0..n).any(|y| t.raw[y * n + x] != 0.0))
        .count();
    (cols, rows)
}

#[test]
fn a_padded_rectangle_crops_to_the_rectangle() {
    for (w, h, rect) in [
        (400, 300, [30, 20, 330, 250]),
        (300, 500, [0, 100, 180, 500]),
        (1000, 1000, [1, 2, 998, 999]),
        (257, 129, [128, 0, 257, 129]),
    ] {
        let t = transform(&padded_rect(w, h, rect, 0.8), w, h, &cfg(128)).expect("transform");
        assert_eq!(t.crop.map(|v| v as usize), rect, "{w} x {h}");
        assert_eq!((t.original_width, t.original_height), (w as u32, h as u32));
        // Everything inside the kept rectangle is content: the canvas holds 0.8 there.
        let (cw, ch) = content_extent(&t);
        assert!(t.raw[..ch * 128]
            .chunks_exact(128)
            .all(|row| row[..cw].iter().all(|&v| (v - 0.8).abs() < 1e-5)));
    }
}

#[test]
fn salt_in_the_padding_and_a_marker_block_in_a_corner_do_not_defeat_the_crop() {
    let (w, h) = (1000, 800);
    let anatomy = [100, 150, 900, 700];
    let mut img = textured(w, h, anatomy);
    // A bright marker block in the top-left corner, 60 x 60: longer than 5% of either side, so
    // only its small share of the bright pixels tells it from anatomy.
    for y in 10..70 {
        img[y * w + 10..y * w + 70].fill(1.0);
    }
    // An "R" block level with the anatomy, in the right-hand padding.
    for y in 400..460 {
        img[y * w + 940..y * w + 990].fill(0.9);
    }
    // Salt: 50 scattered bright pixels, a few of them two to a line.
    for i in 0..50 {
        img[(i * 7919 + 13) % (w * h)] = 1.0;
    }
    let t = transform(&img, w, h, &cfg(256)).expect("transform");
    assert_eq!(t.crop, [100, 150, 900, 700]);
}

#[test]
fn bright_strips_along_the_film_edges_do_not_hold_the_crop_open() {
    // As on cat.dcm: a cassette edge down both sides (together under 5% of a row, as there) and
    // a label band at the bottom; the anatomy reaches the left and right edges.
    let (w, h) = (900, 1200);
    let mut img = textured(w, h, [0, 300, 900, 950]);
    for y in 0..h {
        img[y * w..y * w + 20].fill(0.9);
        img[y * w + w - 20..(y + 1) * w].fill(0.9);
    }
    for y in 1150..1180 {
        img[y * w..(y + 1) * w].fill(0.5);
    }
    let t = transform(&img, w, h, &cfg(256)).expect("transform");
    assert_eq!(t.crop, [0, 300, 900, 950]);
}

#[test]
fn a_constant_image_normalises_to_zero() {
    // Shrunk by a non-integer ratio, by an integer one, kept, and enlarged.
    for (side, size) in [(700, 256), (512, 256), (90, 90), (50, 128)] {
        let img = vec![0.37f32; side * side];
        let t = transform(&img, side, side, &cfg(size)).expect("transform");
        assert!(
            t.raw.iter().all(|&v| (v - 0.37).abs() < 1e-5),
            "{side} -> {size}"
        );
        assert!(t.lcn.iter().all(|&v| v == 0.0), "{side} -> {size}");
    }
    // On a padded canvas the constant part is 0 too, away from the edge of the padding.
    let img = padded_rect(600, 300, [0, 0, 600, 300], 0.37);
    let t = transform(&img, 600, 300, &cfg(128)).expect("transform");
    assert_eq!(content_extent(&t), (128, 64));
    for y in 0..64 - 8 {
        for x in 0..128 {
            let v = t.lcn[y * 128 + x];
            assert!(v.abs() < 1e-4, "({x}, {y}) = {v}");
        }
    }
}

#[test]
fn aspect_ratio_is_preserved_to_one_pixel() {
    for (w, h) in [
        (3000, 1500),
        (1500, 3000),
        (1761, 1237),
        (999, 1000),
        (2614, 3072),
        (300, 17),
    ] {
        let img = vec![0.5f32; w * h];
        let size = 512;
        let t = transform(&img, w, h, &cfg(size)).expect("transform");
        assert_eq!(t.crop, [0, 0, w as u32, h as u32]);
        let (cw, ch) = content_extent(&t);
        assert_eq!(
            cw.max(ch),
            size,
            "{w} x {h}: the long side fills the canvas"
        );
        // Rounding the short side is the only loss: within a pixel of the exact ratio.
        let (exact_w, exact_h) = (w as f64 * t.scale, h as f64 * t.scale);
        assert!(
            (cw as f64 - exact_w).abs() <= 0.5,
            "{w} x {h}: {cw} vs {exact_w}"
        );
        assert!(
            (ch as f64 - exact_h).abs() <= 0.5,
            "{w} x {h}: {ch} vs {exact_h}"
        );
        assert!(
            (cw as f64 / ch as f64 - w as f64 / h as f64).abs() * ch.min(cw) as f64 <= 1.0 + 1e-9,
            "{w} x {h} became {cw} x {ch}"
        );
        // The rest is padding.
        assert!(t
            .raw
            .chunks_exact(size)
            .skip(ch)
            .flatten()
            .all(|&v| v == 0.0));
        assert!(t
            .raw
            .chunks_exact(size)
            .all(|row| row[cw..].iter().all(|&v| v == 0.0)));
    }
}

#[test]
fn a_box_maps_forward_onto_its_pixels_and_back_to_itself() {
    let (w, h) = (2000, 1400);
    let anatomy = [150, 100, 1900, 1300];
    let mut img = textured(w, h, anatomy);
    // A dark "fracture" box inside the anatomy, at known original pixels.
    let fracture = [700usize, 500, 940, 610];
    for y in fracture[1]..fracture[3] {
        img[y * w + fracture[0]..y * w + fracture[2]].fill(0.1);
    }
    let t = transform(&img, w, h, &cfg(512)).expect("transform");
    assert_eq!(t.crop, [150, 100, 1900, 1300]);

    let b = fracture.map(|v| v as f64);
    let m = t.box_to_model(b);
    // Forward: the model pixels that are fully dark are those inside the mapped box.
    let n = t.size;
    let dark: Vec<(usize, usize)> = (0..n)
        .flat_map(|y| (0..n).map(move |x| (x, y)))
        .filter(|&(x, y)| (t.raw[y * n + x] - 0.1).abs() < 1e-4)
        .collect();
    let (dx0, dx1) = (
        dark.iter().map(|p| p.0).min(),
        dark.iter().map(|p| p.0).max(),
    );
    let (dy0, dy1) = (
        dark.iter().map(|p| p.1).min(),
        dark.iter().map(|p| p.1).max(),
    );
    let found = [dx0, dy0, dx1.map(|v| v + 1), dy1.map(|v| v + 1)].map(|v| v.expect("dark") as f64);
    for (got, want) in found.iter().zip(&m) {
        assert!(
            (got - want).abs() <= 1.0,
            "dark pixels {found:?}, mapped box {m:?}"
        );
    }
    // Back: within a pixel of where it started (exactly, up to rounding).
    let back = t.box_to_original(m);
    for (got, want) in back.iter().zip(&b) {
        assert!((got - want).abs() < 1e-9, "{back:?} vs {b:?}");
    }
    // The model pixel grid maps back through the crop and the scale, as serving does it.
    let (ox, oy) = t.to_original(256.0, 128.0);
    assert!((ox - (150.0 + 256.0 / t.scale)).abs() < 1e-9);
    assert!((oy - (100.0 + 128.0 / t.scale)).abs() < 1e-9);
}

#[test]
fn an_integer_ratio_shrink_is_the_block_mean() {
    let (w, h) = (960, 720);
    let img = textured(w, h, [0, 0, w, h]);
    let t = transform(&img, w, h, &cfg(320)).expect("transform");
    assert_eq!(t.scale, 1.0 / 3.0);
    for y in 0..240 {
        for x in 0..320 {
            let mean: f64 = (0..9)
                .map(|k| f64::from(img[(3 * y + k / 3) * w + 3 * x + k % 3]))
                .sum::<f64>()
                / 9.0;
            let got = f64::from(t.raw[y * 320 + x]);
            assert!((got - mean).abs() < 1e-6, "({x}, {y}): {got} vs {mean}");
        }
    }
}

/// The LCN computed naively in f64: renormalised Gaussian window, local mean and standard
/// deviation, divide by max(mean std, std), scale by the largest magnitude.
fn naive_lcn(canvas: &[f32], n: usize, window: usize, sigma: f64) -> Vec<f64> {
    let r = (window / 2) as isize;
    let mut out = vec![0f64; n * n];
    let mut stds = vec![0f64; n * n];
    for py in 0..n as isize {
        for px in 0..n as isize {
            let (mut s, mut s2, mut wsum) = (0.0, 0.0, 0.0);
            for dy in -r..=r {
                for dx in -r..=r {
                    let (x, y) = (px + dx, py + dy);
                    if x < 0 || y < 0 || x >= n as isize || y >= n as isize {
                        continue;
                    }
                    let w = (-((dx * dx + dy * dy) as f64) / (2.0 * sigma * sigma)).exp();
                    let v = f64::from(canvas[y as usize * n + x as usize]);
                    s += w * v;
                    s2 += w * v * v;
                    wsum += w;
                }
            }
            let i = py as usize * n + px as usize;
            let m = s / wsum;
            out[i] = f64::from(canvas[i]) - m;
            stds[i] = (s2 / wsum - m * m).max(0.0).sqrt();
        }
    }
    let c = stds.iter().sum::<f64>() / stds.len() as f64;
    for (v, s) in out.iter_mut().zip(&stds) {
        *v /= s.max(c);
    }
    let max = out.iter().fold(0f64, |m, v| m.max(v.abs()));
    out.iter().map(|v| v / max).collect()
}

#[test]
fn lcn_matches_a_naive_computation_for_other_windows_and_tiny_canvases() {
    // A padded, non-square image (so the canvas has padding and a content edge), a 5 x 5
    // window, and a canvas narrower than a 9 x 9 window.
    let (w, h) = (90, 60);
    let img = textured(w, h, [10, 5, 80, 55]);
    for (size, window, sigma) in [(64, 5, 1.0f32), (64, 9, 2.0), (6, 9, 2.0), (33, 3, 0.7)] {
        let c = TransformConfig {
            size,
            lcn_window: window,
            lcn_sigma: sigma,
            ..TransformConfig::default()
        };
        let t = transform(&img, w, h, &c).expect("transform");
        let want = naive_lcn(&t.raw, size, window, f64::from(sigma));
        for (i, (want, got)) in want.iter().zip(&t.lcn).enumerate() {
            assert!(
                (want - f64::from(*got)).abs() < 1e-4,
                "size {size} window {window}: pixel {i}: {want} vs {got}"
            );
        }
    }
}

#[test]
fn the_result_does_not_depend_on_the_number_of_threads() {
    let (w, h) = (1300, 900);
    let img = textured(w, h, [40, 30, 1250, 880]);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool")
            .install(|| transform(&img, w, h, &cfg(384)).expect("transform"))
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
}

/// The fixtures folder of scripts/fixtures.sh (FRACTURE_FIXTURES when set).
fn fixtures() -> PathBuf {
    if let Ok(d) = std::env::var("FRACTURE_FIXTURES") {
        return PathBuf::from(d);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/fixtures.sh");
    let out = Command::new("bash")
        .arg(script)
        .output()
        .expect("run scripts/fixtures.sh");
    assert!(
        out.status.success(),
        "scripts/fixtures.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("fixtures.sh prints its folder")
            .trim(),
    )
}

/// Decodes a fixture exactly as the preprocess stage does.
fn decode(name: &str) -> pixels::Radiograph {
    let path = fixtures().join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    let obj = pixels::read_object(&bytes).expect("parses");
    pixels::decode(&obj).expect("decodes")
}

/// What every transformed radiograph must satisfy.
fn check_canvas(t: &Transformed) {
    let n = t.size;
    assert_eq!((t.raw.len(), t.lcn.len()), (n * n, n * n));
    assert!(t.raw.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(t.lcn.iter().all(|v| (-1.0..=1.0).contains(v)));
    let peak = t.lcn.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!((peak - 1.0).abs() < 1e-6, "LCN peak {peak}");
    let (cw, ch) = content_extent(t);
    let [x0, y0, x1, y1] = t.crop.map(f64::from);
    assert!((cw as f64 - (x1 - x0) * t.scale).abs() <= 0.5 + 1e-9);
    assert!((ch as f64 - (y1 - y0) * t.scale).abs() <= 0.5 + 1e-9);
    assert_eq!(cw.max(ch), n);
}

#[test]
fn rg3_end_to_end() {
    // A collimated CR ankle, MONOCHROME1: outside the collimation it is white, not black
    // padding, so nothing is cropped.
    let r = decode("RG3_UNCR.dcm");
    assert_eq!((r.width, r.height), (1760, 1760));
    let t = transform(&r.pixels, r.width, r.height, &TransformConfig::default()).expect("ok");
    assert_eq!(t.crop, [0, 0, 1760, 1760]);
    assert!((t.scale - 1024.0 / 1760.0).abs() < 1e-12);
    check_canvas(&t);
    // Known answer: a model pixel is the area average of the original pixels it covers.
    let s = t.scale;
    for (mx, my) in [(0usize, 0usize), (511, 300), (1023, 1023), (700, 900)] {
        let area = |i: usize, len: usize| -> Vec<(usize, f64)> {
            let (a, b) = (i as f64 / s, ((i + 1) as f64 / s).min(len as f64));
            (a.floor() as usize..b.ceil() as usize)
                .map(|j| (j, (b.min(j as f64 + 1.0) - a.max(j as f64)) / (b - a)))
                .collect()
        };
        let want: f64 = area(my, 1760)
            .iter()
            .flat_map(|&(y, wy)| {
                area(mx, 1760)
                    .into_iter()
                    .map(move |(x, wx)| (y, x, wy * wx))
            })
            .map(|(y, x, w)| w * f64::from(r.pixels[y * 1760 + x]))
            .sum();
        let got = f64::from(t.raw[my * 1024 + mx]);
        assert!((got - want).abs() < 1e-5, "({mx}, {my}): {got} vs {want}");
    }
}

#[test]
fn cat_end_to_end() {
    // A DX lateral with black padding above and below, a bright strip down each film edge, a
    // burned-in "R" block under the animal and a label band at the bottom.
    let r = decode("cat.dcm");
    assert_eq!((r.width, r.height), (3072, 2614));
    let t = transform(&r.pixels, r.width, r.height, &TransformConfig::default()).expect("ok");
    let [x0, y0, x1, y1] = t.crop;
    assert_eq!((x0, x1), (0, 3072), "the animal reaches both film edges");
    assert!((300..420).contains(&y0), "top padding cropped: y0 = {y0}");
    assert!(
        (2080..2200).contains(&y1),
        "marker and bottom band cropped: y1 = {y1}"
    );
    assert_eq!(t.scale, 1.0 / 3.0);
    check_canvas(&t);
    // Known answer: scale 1/3 is an integer ratio, so a model pixel is its 3 x 3 block's mean.
    let y0 = y0 as usize;
    for (mx, my) in [(0usize, 0usize), (512, 300), (1023, 100), (77, 555)] {
        let mean: f64 = (0..9)
            .map(|k| f64::from(r.pixels[(y0 + 3 * my + k / 3) * 3072 + 3 * mx + k % 3]))
            .sum::<f64>()
            / 9.0;
        let got = f64::from(t.raw[my * 1024 + mx]);
        assert!((got - mean).abs() < 1e-5, "({mx}, {my}): {got} vs {mean}");
    }
    // The box that serving maps back covers the whole kept anatomy.
    let back = t.box_to_original([0.0, 0.0, 1024.0, (y1 - t.crop[1]) as f64 / 3.0]);
    assert_eq!(back, t.crop.map(f64::from));
}
